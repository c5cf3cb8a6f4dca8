pip install -q --target /tmp/pyt .whl/pytest-8.3.4-py3-none-any.whl .whl/iniconfig-2.0.0-py3-none-any.whl .whl/pluggy-1.5.0-py3-none-any.whl 2>&1 | tail -1
PYTHONPATH=/tmp/pyt:$PWD/.study/mut PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 python3 -m pytest tests/test_triton_kernels.py -m gpu -q --noconftest -p no:cacheprovider -k "ordered_with or padded_rows or graph_capturable or alternates" 2>&1 | tail -4
