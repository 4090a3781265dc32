# Two commands a newcomer needs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
# One intra-op thread: the course's models are tiny, and on 2 cores a second thread spin-waits (measured
# 20-40x slower whenever anything else runs). The benchmark sets its own.
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM = false
export HF_HUB_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1
export MPLBACKEND = Agg

.PHONY: demo test test-fast notebooks figures lab bench clean venv grade

# The stamp is rebuilt only when pyproject.toml changes, so a second `make test` starts at once.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m ipykernel install --prefix $(VENV) --name python3 >/dev/null
	touch $@

venv: $(VENV)/.installed

# --overwrite: `make demo` again replaces the previous demo run (a bare `minidpo demo` refuses to)
demo: $(VENV)/.installed
	$(BIN)/minidpo demo --output-dir runs/demo --overwrite

# Two workers (pytest-xdist): the course's models run on one thread each, so two cores run two notebooks at once.
# --dist loadfile keeps each notebook's cells on one worker, in order. JOBS=1 runs everything in one process.
# The notebooks share one cached world (notebooks/.cache): it is built first (~15 s, with the pool of pi_ref's samples
# that notebook 05's best-of-n reads, ~25 s), not inside whichever notebook comes first while the other waits. Order (--no-loadscope-reorder keeps it): xdist hands each worker two notebooks,
# then the next to whichever is free; 06 runs beside the short ones (a second heavy notebook on the other core
# slows it by ~15%: they share the memory bus), and the rest are longest first.
JOBS ?= 2
NB_FIRST  := $(addprefix notebooks/,06_variants_side_by_side.ipynb 07_claims_checked.ipynb \
             05_tiny_dpo_run_and_frontier.ipynb 01_rlhf_objective_to_optimal_policy.ipynb \
             02_bradley_terry_to_dpo_loss.ipynb 03_dpo_gradient.ipynb 04_preference_displacement.ipynb \
             06b_length_loving_labeller.ipynb 08_online_vs_offline.ipynb 06c_label_noise.ipynb)
NOTEBOOKS := $(foreach f,$(NB_FIRST),$(filter $(f),$(wildcard notebooks/*.ipynb))) \
             $(filter-out $(NB_FIRST),$(sort $(wildcard notebooks/*.ipynb)))
test: $(VENV)/.installed
	$(BIN)/python -m pytest -n $(JOBS) --dist loadfile tests
	cd notebooks && ../$(BIN)/python -c "from minidpo import experiment as e; e.reference_samples(e.build_world(show_progress=False), 256)"
	$(if $(strip $(NOTEBOOKS)),$(BIN)/python -m pytest -n $(JOBS) --dist loadfile --no-loadscope-reorder --nbval-lax \
		--nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider --durations=10 $(NOTEBOOKS))

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest tests -x

# Re-execute every notebook in place (after changing the package), so the committed outputs stay true.
notebooks: $(VENV)/.installed
	cd notebooks && for nb in 0*.ipynb; do \
		../$(BIN)/jupyter nbconvert --to notebook --execute --inplace $$nb || exit 1; done

# The only command that rewrites the tracked figures/ (the README's pictures): the notebooks and the demo, with
# MINIDPO_FIGURES pointing there. Otherwise figures go to runs/figures (ignored), and `git status` stays clean.
figures: $(VENV)/.installed
	MINIDPO_FIGURES=$(CURDIR)/figures $(MAKE) notebooks
	MINIDPO_FIGURES=$(CURDIR)/figures $(BIN)/minidpo demo --output-dir runs/demo-figures --overwrite

# Grade exercise notebooks (a table each; exit 0 only if all pass): `make grade NB=exercises/02_dpo_loss.ipynb`,
# or a folder of submissions: `make grade NB=submissions/`. Default: the student notebooks in exercises/.
NB ?= exercises
grade: $(VENV)/.installed
	$(BIN)/minidpo grade $(NB)

# Jupyter refuses to run as root unless told; containers often run as root
lab: $(VENV)/.installed
	$(BIN)/jupyter lab notebooks $$(if [ "$$(id -u)" = 0 ]; then echo --allow-root; fi)

bench: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[bench]"
	OMP_NUM_THREADS=$$(nproc) $(BIN)/python benchmarks/bench_dpo.py

clean:
	rm -rf $(VENV) runs .cache *.egg-info
