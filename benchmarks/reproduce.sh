#!/usr/bin/env bash
# Every result file in results/ and the README tables rendered from them, in dependency order.
# SmolLM2-135M on the CPU; about three hours on 2 cores. Run from the repository root after `make setup`:
#     KVPACK_DATA=../shared/data bash benchmarks/reproduce.sh
set -euxo pipefail
source .venv/bin/activate
export KVPACK_DATA=${KVPACK_DATA:-../shared/data}
KVQ=fp16,int4,nf4,kivi-4,kvquant-4bit,kvquant-4bit-1pct,int3,nf3,kvquant-3bit,kvquant-3bit-1pct,int2,nf2,kivi-2,kvquant-2bit,kvquant-2bit-1pct
CAL="--calib-data c4[:500] --calib-windows 16"

# Foundation: baselines (8 windows) and the whole test set for fp16 and int4.
kvpack eval --data wikitext2 --seqlen 2048 --max-windows 8 --resume --json results/wikitext2-baselines.json \
  --methods fp16,int4,int3,int2,nf4,kivi-4,kivi-2,int4:pre-rope,int3:pre-rope,int2:pre-rope,int4:pre-rope:key-channel,int3:pre-rope:key-channel,int2:pre-rope:key-channel,int4:key-channel,int3:key-channel,int2:key-channel,nf3
kvpack eval --data wikitext2 --seqlen 2048 --methods fp16,int4 --resume --json results/wikitext2-full.json

# KVQuant: Table 1 on WikiText-2 (16 windows) and held-out C4 (8 windows), ablation at 3 bits (8 windows).
kvpack eval --data wikitext2 --seqlen 2048 --max-windows 16 $CAL --resume --methods $KVQ --json results/wikitext2-kvquant.json
kvpack eval --data 'c4[500:]' --seqlen 2048 --max-windows 8 $CAL --resume --methods $KVQ --json results/c4-heldout-kvquant.json
kvpack eval --data wikitext2 --seqlen 2048 --max-windows 8 $CAL --resume --json results/wikitext2-kvquant-ablation.json \
  --methods fp16,kvquant-3bit-1pct,kvquant-3bit-1pct:fisher-s2,kvquant-3bit-1pct:plain,kvquant-3bit-1pct:uniform,kvquant-3bit-1pct:key-token,kvquant-3bit-1pct:out-matrix,kvquant-3bit-1pct:qnorm,kvquant-3bit,kvquant-3bit-1pct:out0.5,kvquant-3bit-1pct:alloc-global:fisher-s2,kvquant-4bit-1pct:alloc-global:fisher-s2,kvquant-2bit-1pct:alloc-global:fisher-s2,kvquant-3bit-1pct:sink0,kvquant-3bit-1pct:sink4,kvquant-3bit-1pct:post-rope

# Residual VQ: fit once (activations and codecs cached under /tmp/rvq_sweep), presets, sweep, fine-tuning, C4.
W="--calib-windows 16 --work /tmp/rvq_sweep"
python benchmarks/rvq_explore.py $W --fit-only --methods rvq-d8-c2048-g32,rvq-d8-c2048-g32:key-contiguous,rvq-d8-c2048-g32:value-strided,rvq-d8-c1024-g64,rvq-d6-c1024-g32,rvq-d8-c2048-g32:kmeans-only,rvq-d8-c2048-g32:1pct
python benchmarks/rvq_explore.py $W --eval-windows 16 --save-recipes /tmp/kvpack-recipes \
  --methods rvq-d8-c2048-g32,rvq-d8-c1024-g64,rvq-d6-c1024-g32 --json results/rvq-wikitext2.json
kvpack finetune --recipe /tmp/kvpack-recipes/rvq-d8-c2048-g32 --steps 200 --out /tmp/kvpack-ft/rvq-d8-c2048-g32-ft
python benchmarks/rvq_explore.py $W --eval-windows 16 --depths 1,2,3,4,5,6,7 --json results/rvq-sweep-wikitext2-16w.json \
  --methods rvq-d8-c2048-g32,rvq-d8-c2048-g32:key-contiguous,rvq-d8-c2048-g32:value-strided,rvq-d8-c2048-g32:kmeans-only,rvq-d8-c2048-g32:sink1
python benchmarks/rvq_explore.py $W --eval-windows 16 --no-fp16 --methods rvq-d8-c2048-g32:1pct --json results/rvq-sweep-wikitext2-16w.json
python benchmarks/rvq_explore.py $W --eval-windows 16 --methods rvq-d8-c2048-g32 --train-vectors 196608 --json results/rvq-train-data-16w.json
python benchmarks/rvq_explore.py $W --eval-windows 16 --no-fp16 --methods rvq-d4-c2048-g32 --json results/rvq-wikitext2.json
python benchmarks/rvq_explore.py $W --eval-windows 16 --no-fp16 --finetuned /tmp/kvpack-ft/rvq-d8-c2048-g32-ft \
  --methods fp16 --json results/rvq-wikitext2.json
python benchmarks/rvq_explore.py $W --eval-data 'c4[500:]' --eval-windows 8 \
  --methods rvq-d8-c2048-g32,rvq-d4-c2048-g32,rvq-d8-c1024-g64,rvq-d6-c1024-g32 --json results/rvq-c4-heldout.json
python benchmarks/rvq_explore.py $W --eval-data 'c4[500:]' --eval-windows 8 --methods '' \
  --finetuned /tmp/kvpack-ft/rvq-d8-c2048-g32-ft --json results/rvq-c4-heldout.json
python benchmarks/rvq_speed.py --threads 1 2

# The real cache: streamed vs simulated perplexity, bytes, greedy agreement; HF QuantizedCache.
python benchmarks/cache_real_vs_sim.py --methods fp16,kivi-2,kvquant-4bit-1pct,kvquant-3bit-1pct,rvq-d8-c2048-g32 \
  --seqlen 2048 --windows 2 --chunk 1 --calib-windows 16 --calib-seqlen 2048 --recipes /tmp/kvpack-recipes --noise-seeds 6
python benchmarks/cache_real_vs_sim.py --methods kvquant-3bit-1pct,rvq-d8-c2048-g32 --seqlen 2048 --windows 16 --calib-windows 16 \
  --calib-seqlen 2048 --recipes /tmp/kvpack-recipes --noise-seeds 4 --skip real,memory,generation
python benchmarks/cache_memory_shapes.py
pip install -q hqq optimum-quanto
python benchmarks/hf_quantized_cache.py --seqlen 512 --windows 1

# Speed, planning, retrieval.
kvpack eval --task passkey --methods fp16,kvquant-4bit-1pct,kvquant-3bit-1pct --lengths 1024,2048,4096,8000 \
  --depths 0,0.5,1 --trials 1 --calib-windows 16 --seqlen 2048 --json results/passkey.json --plot results/passkey.png
kvpack plan --model llama-2-7b --memory 80GiB --method kvquant-2bit-1pct,kvquant-3bit-1pct,kvquant-4bit-1pct,kvquant-2bit,rvq-d8-c2048-g32
kvpack bench --device cpu --contexts 2048,8192,32768 --methods fp16,kvquant-4bit-1pct,kvquant-3bit-1pct,rvq-d8-c2048-g32 \
  --rounds 5 --json results/bench-cpu.json --plot results/bench-cpu.png

# Quality at 3 and 2 bits: the kvpack presets (shipped recipes), TurboQuant, shared RVQ codebooks.
kvpack calibrate --model smollm2-135m --method kvpack-4bit,kvpack-3bit,kvpack-2bit --data 'c4[:500]' --windows 16 \
  --seqlen 2048 --out src/kvpack/recipes/shipped --manifest
QUALITY=fp16,kivi-4,kivi-2,kvquant-4bit-1pct,kvquant-3bit-1pct,kvquant-2bit-1pct,turboquant-3.5bit,turboquant-2.5bit,\
rvq-d8-c2048-g32,rvq-d8-c2048-g32:share-all,kvpack-4bit,kvpack-3bit,kvpack-2bit,\
kvpack-4bit:recent16,kvpack-3bit:recent16,kvpack-2bit:recent16
kvpack eval --methods $QUALITY --data wikitext2 --max-windows 16 --calib-windows 16 --json results/quality-wikitext2.json
kvpack eval --methods $QUALITY --data 'c4[500:]' --max-windows 8 --calib-windows 16 --json results/quality-c4.json
kvpack eval --data wikitext2 --max-windows 8 --calib-windows 16 --json results/kvpack-ablation.json \
  --methods fp16,kvquant-3bit-1pct,kvquant-3bit-1pct:fisher-s2,kvquant-3bit-1pct:alloc-layer,kvquant-3bit-1pct:fisher-s2:alloc-layer,\
kvquant-3bit-1pct:fisher-s2:alloc-layer:qnorm,kvquant-3bit-1pct:alloc-global,kvquant-3bit-1pct:fisher-s2:alloc-global:budget0,\
kvquant-3bit-1pct:fisher-s2:alloc-global,kvquant-3bit-1pct:fisher-s2:alloc-global:qnorm
kvpack eval --methods fp16,kvpack-4bit,kvpack-3bit,kvpack-2bit,kvquant-3bit-1pct,turboquant-3.5bit --data wikitext2 \
  --seqlen 8192 --calib-seqlen 2048 --max-windows 4 --calib-windows 16 --json results/quality-8k.json
python benchmarks/cache_real_vs_sim.py --methods kvpack-4bit,kvpack-3bit,kvpack-2bit --seqlen 2048 --windows 2 --chunk 1 \
  --calib-windows 16 --calib-seqlen 2048 --skip memory,generation --noise-seeds 4
python benchmarks/cache_real_vs_sim.py --methods kvpack-4bit:recent16,kvpack-3bit:recent16,kvpack-2bit:recent16 --seqlen 2048 \
  --windows 2 --chunk 1 --calib-windows 16 --calib-seqlen 2048 --skip memory,generation --noise-seeds 4
python benchmarks/rvq_total_bytes.py --table results/quality-wikitext2.json \
  --methods fp16,rvq-d8-c2048-g32,rvq-d8-c2048-g32:share-all,kvpack-3bit --json results/rvq-total-bytes.json
kvpack bench --contexts 2048,8192 --methods kvquant-3bit-1pct,kvpack-3bit,turboquant-3.5bit --timing-threads 1 \
  --json results/bench-cpu-kvpack.json
for isa in avx512 avx2; do  # the mixed-width kernels built for each instruction set (avx512 needs such a CPU)
  KVPACK_CPU_ISA=$isa kvpack bench --contexts 8192,32768 --timing-threads 1 --rounds 5 --model-prefill-tokens 2048 \
    --methods dynamic-fp32,dynamic-bf16,kvquant-3bit-1pct,kvpack-4bit,kvpack-3bit,kvpack-2bit --json results/bench-cpu-kvpack-$isa.json
done

kvpack report
