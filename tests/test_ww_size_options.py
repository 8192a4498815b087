"""WeightWatcher 0.7.7's ``min_size``/``max_size``: it ignores them (with a warning), and so does zooscope.analyze;
compared with WeightWatcher 0.7.7 run with the same arguments (1e-6 relative)."""
import contextlib
import io
import logging
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ww_module = pytest.importorskip("weightwatcher")

import zooscope  # noqa: E402
from conftest import heavy_tailed_  # noqa: E402


def test_min_size_max_size_are_ignored_with_a_warning_like_weightwatcher():
    model = heavy_tailed_(torch.nn.Sequential(torch.nn.Linear(300, 100), torch.nn.ReLU(), torch.nn.Linear(100, 20)),
                          seed=3)
    logging.getLogger("weightwatcher").setLevel(logging.CRITICAL)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = ww_module.WeightWatcher(model=model).analyze(min_evals=10, min_size=50, max_size=60)
    with pytest.warns(UserWarning, match="min_size=50 is ignored.*min_evals"):
        ours = zooscope.analyze(model, min_evals=10, min_size=50, max_size=60, ww_compat=True)
    assert list(ours["longname"]) == list(theirs["longname"]) == ["0", "2"]  # 20 evals < min_size kept
    for column in ("alpha", "D", "xmin", "lambda_max"):
        np.testing.assert_allclose(ours[column].to_numpy(float), theirs[column].to_numpy(float), rtol=1e-6)
