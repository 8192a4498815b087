"""WeightWatcher 0.7.7's ``min_size``/``max_size``/``glorot_fix``: it ignores them (``glorot_fix`` through a typo),
and so does zooscope.analyze, with a warning; compared with WeightWatcher 0.7.7 run with the same arguments
(1e-6 relative)."""
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


def test_ignored_options_warn_and_match_weightwatcher():
    model = heavy_tailed_(torch.nn.Sequential(torch.nn.Linear(300, 100), torch.nn.ReLU(), torch.nn.Linear(100, 20)),
                          seed=3)
    logging.getLogger("weightwatcher").setLevel(logging.CRITICAL)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = ww_module.WeightWatcher(model=model).analyze(min_evals=10, min_size=50, max_size=60, glorot_fix=True)
    with pytest.warns(UserWarning) as record:
        ours = zooscope.analyze(model, min_evals=10, min_size=50, max_size=60, glorot_fix=True, ww_compat=True)
    messages = " ".join(str(w.message) for w in record)
    assert "min_size=50 is ignored" in messages and "glorot_fix=True is ignored" in messages
    plain = ww_module.WeightWatcher(model=model).analyze(min_evals=10)  # glorot_fix really changes nothing there
    np.testing.assert_array_equal(plain["alpha"], theirs["alpha"])
    assert list(ours["longname"]) == list(theirs["longname"]) == ["0", "2"]  # 20 evals < min_size kept
    for column in ("alpha", "D", "xmin", "lambda_max"):
        np.testing.assert_allclose(ours[column].to_numpy(float), theirs[column].to_numpy(float), rtol=1e-6)
