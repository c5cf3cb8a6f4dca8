mkdir -p /tmp/s /tmp/b2 && ln -sfn $PWD/kernels /tmp/s/asynctls_tip_kernels && ln -sfn $PWD/.baseline_kernels2/asynctls_tip_kernels /tmp/b2/asynctls_tip_kernels
export PYTHONUNBUFFERED=1
for t in new base new; do P=/tmp/s; [ $t = base ] && P=/tmp/b2; PYTHONPATH=$P python3 .study/vllm_cond.py $t 2>&1 | grep "^{"; done
