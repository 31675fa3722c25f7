# Nsight Compute on one 64k NSA prefill call (paper shape): the last 16k-row slice's kernels,
# full section set, then the details page and per-SASS-line source pages (stall samples) as text.
# Run on the GPU machine from the repo root: bash scripts/device_ncu_prefill.sh [LEN] [CONFIG]
source scripts/device_env.sh
export PYTHONWARNINGS=ignore
LEN=${1:-65536}
CFG=${2:-}
# The packing kernel, then four slices of three kernels (four with slc_topn=0: _topn before _slc).
if [[ "$CFG" == *slc_topn=0* ]]; then SKIP=13 COUNT=4; else SKIP=10 COUNT=3; fi
ncu --version | tail -1
ncu --clock-control none --profile-from-start off --set full --launch-skip $SKIP --launch-count $COUNT \
    -f -o /tmp/pf python3 scripts/ncu_prefill.py --len "$LEN" --config "$CFG" > "$OUT/ncu_run.log" 2>&1
tail -5 "$OUT/ncu_run.log"
ncu -i /tmp/pf.ncu-rep --page details > "$OUT/details.txt" 2>&1
mkdir -p /tmp/src
for k in _cmp_kernel _win_kernel _topn_kernel _slc_kernel; do
  ncu -i /tmp/pf.ncu-rep --page source --print-source sass --csv -k "$k" > "/tmp/src/$k.csv" 2>&1
done
ls -la /tmp/src
tar czf "$OUT/src.tgz" -C /tmp src
grep -E "^  _|Duration|Compute \(SM\) Throughput|Memory Throughput|L2 Cache Throughput|L1/TEX Cache Throughput|DRAM Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Executed Ipc A|Issue Slots Busy|No Eligible" "$OUT/details.txt"
