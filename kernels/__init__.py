"""Pure array math (numpy in, numpy out) with device variants chosen by ``backend=``. Imports nothing of ours."""
