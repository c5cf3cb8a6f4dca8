#!/usr/bin/env bash
# GPU machine, after next_gpu.sh and the kit's p2 (carry .vllm-gpu/p3): the GLM-4.7-Flash-shaped asynctls engine
# at 32K (fp8, 3 repeats, the stepped 136-token decode) with `warm_write_index` in the code, then every
# `jit_monitor` line of its logs: none may name the plugin's kernels. Writes $OUT/t.
bash benchmarks/results/key_tail_glm_2026-11-27/studies/tput.sh asynctls 32768 3
grep -h "jit_monitor\|JIT compilation" /tmp/tput_glm-4.7-flash/tput_*.log | tee $OUT/t/jit_lines.log
echo "jit_monitor lines: $(wc -l < $OUT/t/jit_lines.log)" | tee -a $OUT/t/jit_lines.log
