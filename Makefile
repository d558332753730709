# Cross-dataset retinal lesion segmentation (Playout & Cheriet): one Makefile for setup, tests, the sweep.
#   make demo                 # the whole study at toy scale on the synthetic datasets, CPU, < 10 min
#   make test                 # the test suite (sets up .venv first)
#   make help                 # every target, one line each
#   make -j4 all-combos GPUS=0,1,2,3 DATA_ROOT=/data/fundus    # 31 combinations x SEEDS, paper settings
#   make all-combos DATASETS=IDR,ABC DATA_FLAGS="--root ABC=/data/clinic"  # with a dataset of your own
# Every setting of the sweep is a make variable: `make all-combos ITERS=500 RESOLUTION=256 ENCODER=resnet18`.

PY      := .venv/bin/python
VENV    := .venv/.stamp

# ---- the sweep's settings (paper defaults; override on the command line) ----
DATA_ROOT  ?= data_raw
CACHE      ?= cache
RUNS       ?= runs
SEEDS      ?= 8
RESOLUTION ?= 1536
PATCH      ?= 512
ITERS      ?= 20000
BATCH      ?= 8
LR         ?= 3e-4
ENCODER    ?= legacy_seresnet101.in1k
VAL_EVERY  ?= 1000
# the sweep's datasets: the five, or any of them with datasets of your own (docs/DATA.md, "Your own
# dataset"), whose folders DATA_FLAGS gives (--root ABC=DIR); it reaches every command reading data
DATASETS   ?= IDR,DDR,FGA,RET,MES
TESTS      ?= $(DATASETS)
DATA_FLAGS ?=
GPUS       ?=
TRAIN_FLAGS ?=
EVAL_FLAGS  ?=
FIG4_FLAGS  ?=
TUNE_FLAGS  ?=
COMBO      ?= IDR+DDR+MES

# The 2^D - 1 non-empty combinations of DATASETS (the five: 31), in canonical order (IDR DDR FGA RET
# MES, then one's own), as run names like IDR+DDR. An unknown ID stops the targets that use them.
comma := ,
space := $(subst ,, )
COMBOS := $(shell python3 data/ids.py combos $(subst $(space),$(comma),$(strip $(DATASETS))) 2>&1)
ifeq ($(firstword $(COMBOS)),error:)
$(if $(filter all-combos print-combos fig4-sweep slurm-sweep,$(MAKECMDGOALS)),\
  $(error DATASETS=$(DATASETS): $(wordlist 2,999,$(COMBOS))))
COMBOS :=
endif
SEED_LIST := $(shell seq 0 $$(( $(SEEDS) - 1 )))
RESULTS := $(foreach c,$(COMBOS),$(foreach s,$(SEED_LIST),$(RUNS)/$(c)/s$(s)/results.json))

.PHONY: help print-combos setup test test-all bench real demo demo-jobs all-combos authors-models report table2 table3 fig3 fig4 characterize tune clean-demo
.PHONY: fig4-sweep slurm-sweep slurm-tune
.DELETE_ON_ERROR:

setup: $(VENV)  ## build .venv from requirements.txt and requirements-dev.txt
$(VENV): requirements.txt requirements-dev.txt
	python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

# `make help`: every target with its "##" description (setup stays the first target: `make`
# alone builds .venv, as before)
help:  ## list the targets, each with what it does
	@awk -F ':.*## ' '/^[a-zA-Z0-9_ -]+:.*## / {printf "  %-28s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

test: $(VENV)  ## the test suite on CPU (Triton kernels under TRITON_INTERPRET=1)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

test-all: $(VENV)  ## the test suite including the tests marked slow
	TRITON_INTERPRET=1 $(PY) -m pytest -q --runslow tests

bench: $(VENV)  ## speed against the peers (BENCHMARKS.md)
	$(PY) bench/bench_data.py
	$(PY) bench/bench_metrics.py --threads 1
	$(PY) bench/bench_train.py --threads 1 --steps 20
	$(PY) bench/bench_images.py

# Does the recipe learn real lesions? The four lesions of 14 real IDRiD photographs (tests/fixtures/idrid-4l14),
# from scratch on CPU, about 15 min (BENCHMARKS.md, "Real lesions"); REAL_FLAGS go to train.py after the recipe's.
REAL_OUT ?= bench/out/real
REAL_FLAGS ?=
real: $(VENV)  ## does the recipe learn the four lesions of real IDRiD photographs? (CPU, ~15 min)
	OMP_NUM_THREADS=1 $(PY) bench/real.py --out $(REAL_OUT) -- $(REAL_FLAGS)

print-combos:  ## the run names of DATASETS' combinations (the five: 31), one line
	@echo $(COMBOS)

# ---- the sweep: each run's results.json is a target, so an interrupted sweep resumes where it stopped ----
all-combos: $(RESULTS)  ## train and evaluate the combinations of DATASETS (the five: 31) x SEEDS

# $* is COMBO/sSEED, or COMBO/cond-sSEED for a style-conditioned run (train.py --style-condition style, evaluated
# at the fine style); train.py itself resumes from last.pt and skips a finished run.
run_seed = $(lastword $(subst s, ,$(notdir $(1))))
run_flags = $(if $(filter cond-s%,$(notdir $(1))),--style-condition style)
# MEMBERS=FILE: each seed's own train.py flags, a line "sN: FLAGS" per seed (the paper's "8 models trained with
# slightly different hyperparameters", section 3.2; `tune.py --show --members 8` writes one from a study).
# They come after TRAIN_FLAGS, so they win; a seed the file lacks stops that run with one line.
MEMBERS ?=
HASH := \#
member_flags = $(if $(MEMBERS),member=$$(awk -v s=s$(call run_seed,$(1)): '$$1 == s {sub(/$(HASH).*/, ""); $$1 = ""; print; f = 1} \
	END {exit !f}' "$(MEMBERS)") || { echo "error: MEMBERS=$(MEMBERS) has no line s$(call run_seed,$(1)):" >&2; exit 1; };)
# The run scores best.pt on TESTS itself when training ends (train.py --test: evaluate.py's evaluate() in the
# same process, into $@); with EVAL_FLAGS (--tta, --tile, ...), evaluate.py scores it after.
$(RUNS)/%/results.json: | $(VENV)
	$(call member_flags,$*)sh gpu_slot.sh "$(GPUS)" $(PY) train.py --train $(patsubst %/,%,$(dir $*)) --seed $(call run_seed,$*) --out $(RUNS)/$* --data-root $(DATA_ROOT) --cache $(CACHE) --resolution $(RESOLUTION) --patch $(PATCH) --iters $(ITERS) --batch $(BATCH) --lr $(LR) --encoder $(ENCODER) --val-every $(VAL_EVERY)$(if $(EVAL_FLAGS),, --test $(TESTS)) $(DATA_FLAGS) $(call run_flags,$*) $(TRAIN_FLAGS)$(if $(MEMBERS), $$member)
	$(if $(EVAL_FLAGS),sh gpu_slot.sh "$(GPUS)" $(PY) evaluate.py --ckpt $(RUNS)/$*/best.pt --test $(TESTS) --data-root $(DATA_ROOT) --cache $(CACHE) --out $@ $(strip $(DATA_FLAGS) $(EVAL_FLAGS)))

# ---- the sweep on Slurm (docs/STUDY.md, "On Slurm"): ONE job array, a task per run of the plan
# whose results.json is missing, each making that run's target above with the sweep's variables,
# through slurm_task.sh. SLURM_WARN s before its time limit a task gets SIGUSR1: train.py writes
# last.pt and the task requeues itself; a failed task is requeued SLURM_RETRIES times. Logs:
# RUNS/slurm/sweep_JOB_TASK.log. SLURM_REPORT: a job that runs `make report` once the array has
# ended (--time=SLURM_REPORT_TIME). `make -n slurm-sweep` prints the sbatch command. A second
# submission while an array of the same RUNS is queued is refused (the array's --comment is RUNS).
SLURM_GRES     ?= gpu:1
SLURM_TIME     ?= 24:00:00
SLURM_CPUS     ?= 8
SLURM_WARN     ?= 600
SLURM_RETRIES  ?= 1
SLURM_PARALLEL ?=
SLURM_FLAGS    ?=
SLURM_REPORT   ?= yes
SLURM_REPORT_TIME ?= 2:00:00
TODO = $(filter-out $(wildcard $(RESULTS)),$(RESULTS))
shquote = '$(subst ','\'',$(1))'
# VAR=value for the tasks' make, quoted for the shell. NOTE: $ doubled: that make expands a
# command-line value once more, and must see the value this make expanded to.
pass_vars = $(foreach v,$(1),$(call shquote,$(v)=$(subst $$,$$$$,$($(v)))))
SWEEP_VARS := DATA_ROOT CACHE RUNS RESOLUTION PATCH ITERS BATCH LR ENCODER VAL_EVERY DATASETS \
	TESTS DATA_FLAGS TRAIN_FLAGS EVAL_FLAGS MEMBERS AUTHORS REPORT
# --array=0-K for a list of K+1 items; SLURM_PARALLEL=N: at most N tasks at once (%N)
slurm_array = --array=0-$(words $(wordlist 2,$(words $(1)),$(1)))$(if \
	$(SLURM_PARALLEL),%$(SLURM_PARALLEL))
SBATCH = sbatch --parsable --chdir=$(call shquote,$(CURDIR)) --requeue --open-mode=append \
	--signal=B:USR1@$(SLURM_WARN) --time=$(SLURM_TIME) --cpus-per-task=$(SLURM_CPUS) \
	$(if $(SLURM_GRES),--gres=$(SLURM_GRES)) $(SLURM_FLAGS)
# The jobs' make never rebuilds the venv (-o): that is the submitter's, made once, not by every
# task at once; nor does it inherit this make's MAKEFLAGS: it runs what its command line says.
# NOTE: `make`, not $(MAKE), in the jobs' command lines: make -n runs every line naming $(MAKE).
JOB_MAKE = env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL make --no-print-directory -o $(VENV)
define sweep_submit
runs=$$(realpath -m -- $(call shquote,$(RUNS))) && \
if squeue -h --me -n sweep -o %k | grep -qxF -- "$$runs"; then echo "error: an array of" \
  "RUNS=$$runs is in the queue (squeue --me -n sweep); submitting again would run its" \
  "unfinished runs twice: wait for it to end, or scancel it first" >&2; exit 1; fi && \
mkdir -p $(RUNS)/slurm && id=$$($(strip $(SBATCH)) --job-name=sweep --comment="$$runs" \
  $(call slurm_array,$(TODO)) --output=$(RUNS)/slurm/sweep_%A_%a.log \
  slurm_task.sh $(SLURM_RETRIES) \
  $(JOB_MAKE) $(call pass_vars,$(SWEEP_VARS)) GPUS= -- $(TODO)) && id=$${id%%;*} && \
echo "slurm-sweep: job array $$id, $(words $(TODO)) task(s);" \
  "logs $(RUNS)/slurm/sweep_$${id}_TASK.log" $(if $(SLURM_REPORT),&& $(report_submit))
endef
define report_submit
rid=$$(sbatch --parsable --chdir=$(call shquote,$(CURDIR)) --dependency=afterany:$$id \
  --job-name=report --time=$(SLURM_REPORT_TIME) $(SLURM_FLAGS) \
  --output=$(RUNS)/slurm/report_%j.log slurm_task.sh 0 \
  $(JOB_MAKE) $(call pass_vars,$(SWEEP_VARS)) report) && \
echo "slurm-sweep: job $${rid%%;*} runs make report once the array has ended"
endef
slurm-sweep: | $(VENV)  ## the sweep as one Slurm job array (docs/STUDY.md)
	$(if $(TODO),$(sweep_submit),@echo "slurm-sweep: every run of the plan has its results.json \
	in $(RUNS); nothing to submit")

# ---- the Optuna search on Slurm: TUNE_WORKERS array tasks of `make tune` against one study in
# one database (TUNE_STORAGE, PostgreSQL), task K with its own sampler seed TUNE_SEED=K; the
# SLURM_* variables as above.
TUNE_WORKERS ?= 4
TUNE_STORAGE ?=
tune_seeds = $(foreach k,$(shell seq 0 $$(( $(TUNE_WORKERS) - 1 ))),TUNE_SEED=$(k))
define tune_submit
mkdir -p $(RUNS)/slurm && id=$$($(strip $(SBATCH)) --job-name=tune \
  $(call slurm_array,$(tune_seeds)) --output=$(RUNS)/slurm/tune_%A_%a.log \
  slurm_task.sh $(SLURM_RETRIES) $(JOB_MAKE) \
  $(call pass_vars,DATA_ROOT CACHE COMBO TUNE_STORAGE TUNE_FLAGS) tune -- $(tune_seeds)) && \
id=$${id%%;*} && echo "slurm-tune: job array $$id, $(TUNE_WORKERS) worker(s);" \
  "logs $(RUNS)/slurm/tune_$${id}_TASK.log"
endef
slurm-tune: | $(VENV)  ## the Optuna search as a Slurm job array (TUNE_STORAGE=...)
	$(if $(TUNE_STORAGE),$(tune_submit),@echo "error: make slurm-tune needs \
	TUNE_STORAGE=postgresql://USER@HOST/DB, the one database of every worker (its password in \
	~/.pgpass: the URL is on the job's command line)" >&2; exit 1)

# ---- Figure 4 for one combination: baseline, ensemble of 4, SWA and soups on encoder / decoder / full ----
# (FIG4_FLAGS="--bn both" reports each average with averaged and with recomputed BatchNorm statistics)
# COMBO in any order or case (IDR+MES+DDR) names the canonical run folder (IDR+DDR+MES)
canonical = $(shell python3 data/ids.py canonical $(1))
fig4: $(RUNS)/$(call canonical,$(COMBO))/fig4.json  ## Figure 4 (ensemble, SWA, soups) for COMBO
$(RUNS)/%/fig4.json: | $(VENV)
	$(PY) fig4.py $(RUNS)/$* --test $(TESTS) --data-root $(DATA_ROOT) --cache $(CACHE) -o $@ $(strip $(DATA_FLAGS) $(FIG4_FLAGS))

# ---- Figure 4 over the sweep, as the paper draws it (mean Dice per training set, one series per
# method): fig4 for every combination under RUNS with best.pt of at least 2 seeds (the others: a
# note each), with fig4's variables (TESTS, FIG4_FLAGS, ...); `make report` then draws
# figure4_sweep.png beside figure4.png.
fig4-sweep: | $(VENV)  ## Figure 4 for every combination with 2 seeds
	@ready=""; empty=0; for c in $(COMBOS); do \
	  n=$$(ls -d $(RUNS)/$$c/s*/best.pt 2>/dev/null | grep -cE '/s[0-9]+/best\.pt$$'); \
	  if [ $$n -ge 2 ]; then ready="$$ready $(RUNS)/$$c/fig4.json"; \
	  elif [ -d "$(RUNS)/$$c" ]; then echo "note: fig4-sweep skips $$c: best.pt of $$n seed(s)" \
	    "in $(RUNS)/$$c/s*/ (Figure 4 needs 2)"; \
	  else empty=$$((empty + 1)); fi; done; \
	[ $$empty -eq 0 ] || \
	  echo "note: fig4-sweep skips $$empty combination(s) without a folder in $(RUNS)"; \
	[ -n "$$ready" ] || { echo "error: no combination in $(RUNS) has best.pt of 2 seeds" \
	  "(make all-combos first)" >&2; exit 1; }; \
	$(MAKE) --no-print-directory $$ready && echo "fig4-sweep: $$(echo $$ready | wc -w)" \
	  "combination(s) -> $(RUNS)/<COMBO>/fig4.json; make report draws them"

# ---- the report: tables and figures regenerated from the results files ----
characterize: $(VENV)  ## Table 1, labelling styles, image quality -> report/characterize
	$(PY) characterize.py --datasets $(TESTS) --data-root $(DATA_ROOT) --cache $(CACHE) --out report/characterize $(DATA_FLAGS)

# ---- the authors' 31 released models (hub:COMBO, downloaded once into the Hugging Face cache), each scored on the
# test sets under our protocol, on their own splits (their test images), at their 1024 px; report.py shows them.
# They were trained on the five: their 31 combinations, whatever DATASETS says ----
AUTHORS       ?= authors
AUTHORS_FLAGS ?= --split-protocol authors --dice-argmax
authors-models: $(foreach c,$(shell python3 data/ids.py combos),$(AUTHORS)/$(c)/results.json)  ## the authors' 31 models on the test sets
$(AUTHORS)/%/results.json: | $(VENV)
	sh gpu_slot.sh "$(GPUS)" $(PY) evaluate.py --ckpt hub:$* --test $(TESTS) --data-root $(DATA_ROOT) --cache $(CACHE) --out $@ $(strip $(AUTHORS_FLAGS) $(DATA_FLAGS) $(EVAL_FLAGS))

REPORT ?= report
report table2 table3 fig3: $(VENV)  ## Tables 2-3, Figures 3-4 from RUNS -> REPORT
	$(PY) report.py $(RUNS) -o $(REPORT) --authors $(AUTHORS)

# ---- the paper's Optuna search (tune.py --help). Many workers: `make slurm-tune`, or each its own
# TUNE_SEED=N with one TUNE_STORAGE=postgresql://...; TUNE_FLAGS come after, so they win, and may
# end with `-- train.py flags`.
TUNE_SEED ?=
tune_args = --train $(subst +,$(comma),$(COMBO)) --data-root $(DATA_ROOT) --cache $(CACHE) \
	$(if $(TUNE_STORAGE),--storage $(call shquote,$(TUNE_STORAGE))) \
	$(if $(TUNE_SEED),--seed $(TUNE_SEED))
# DATA_FLAGS are train.py's (tune.py passes what follows `--` on): after TUNE_FLAGS' own `--` if any
tune_data = $(if $(DATA_FLAGS),$(if $(findstring -- ,$(TUNE_FLAGS) ),,--) $(DATA_FLAGS))
tune: $(VENV)  ## the paper's Optuna search for COMBO (tune.py --help)
	$(PY) tune.py $(tune_args) $(TUNE_FLAGS) $(tune_data)

# ---- the main job on the embedded default: the whole study at toy scale, CPU, under 10 minutes ----
# synthetic datasets -> prepared caches -> characterize -> a reduced sweep (every single dataset, every
# leave-one-out combination, all five, and fine-only combinations beside the same plus the coarse RET) -> evaluation -> Figure 4
# averaging for one combination -> report. Everything lands under demo/; rerunning redoes only what is missing.
DEMO := demo
DEMO_IMAGES ?= 30
DEMO_SIZE ?= 256
DEMO_RESOLUTION ?= 256
DEMO_PATCH ?= 64
DEMO_ITERS ?= 150
DEMO_BATCH ?= 16
DEMO_COMBOS ?= IDR DDR FGA RET MES IDR+DDR+MES \
	DDR+FGA+RET+MES IDR+FGA+RET+MES IDR+DDR+RET+MES IDR+DDR+FGA+MES IDR+DDR+FGA+RET IDR+DDR+FGA+RET+MES
DEMO_FIG4 ?= IDR+DDR+MES
# style conditioning (beyond the paper): DEMO_COND with and without --style-condition style, two seeds each,
# beside the fine-only DEMO_FIG4 (its two seeds); maps of both styles for one test photograph
DEMO_COND ?= IDR+DDR+RET+MES
DEMO_VARS = DATA_ROOT=$(DEMO)/data CACHE=$(DEMO)/cache RUNS=$(DEMO)/runs RESOLUTION=$(DEMO_RESOLUTION) \
	PATCH=$(DEMO_PATCH) ITERS=$(DEMO_ITERS) BATCH=$(DEMO_BATCH) LR=3e-3 ENCODER=test_resnet VAL_EVERY=50 \
	TRAIN_FLAGS="--no-pretrained --decoder-channels 64,32,32,16,16 --warmup 10 --snapshot-every 75 --device cpu --workers 0"
DEMO_RESULTS = $(foreach c,$(DEMO_COMBOS),$(DEMO)/runs/$(c)/s0/results.json) $(DEMO)/runs/$(DEMO_FIG4)/s1/results.json \
	$(foreach r,s1 cond-s0 cond-s1,$(DEMO)/runs/$(DEMO_COND)/$(r)/results.json)

demo: $(VENV)  ## the whole study at toy scale on synthetic data, CPU, < 10 min
	@test -f $(DEMO)/data/.done || { $(PY) -m data.synthetic --out $(DEMO)/data --images $(DEMO_IMAGES) \
		--size $(DEMO_SIZE) && touch $(DEMO)/data/.done; }
	$(PY) -m data.prepare --dataset all --data-root $(DEMO)/data --cache $(DEMO)/cache --resolution $(DEMO_RESOLUTION)
	OMP_NUM_THREADS=1 $(MAKE) --no-print-directory -j2 demo-jobs $(DEMO_VARS) DEMO_COMBOS="$(DEMO_COMBOS)"
	$(PY) report.py $(DEMO)/runs -o $(DEMO)/report --real $(DEMO)/real/real.json \
		--real-styles $(DEMO)/real_styles/table3.json
	@echo "demo done: $(DEMO)/report/report.md"

# The demo's jobs, two at a time (make -j2): every one a file target, so a rerun redoes only what is missing,
# and Figure 4, the characterization and the style maps run beside the training runs as soon as their inputs are
# there. The longest job (the real-data check) comes first.
DEMO_FIG4_JSON = $(DEMO)/runs/$(DEMO_FIG4)/fig4.json
DEMO_STYLE_MAPS = $(DEMO)/report/style_maps/.done
demo-jobs: $(DEMO)/real/real.json $(DEMO)/real_styles/table3.json $(DEMO_RESULTS) $(DEMO_FIG4_JSON) $(DEMO)/report/characterize/characterize.json \
	$(DEMO_STYLE_MAPS)

# the real-data check (BENCHMARKS.md, "Real lesions"), shorter than `make real`
# (at 512 px an MA is 1-2 pixels wide, so the demo is not expected to learn MA)
DEMO_REAL_FLAGS ?= --iters 150 --val-every 50
$(DEMO)/real/real.json: | $(VENV)
	OMP_NUM_THREADS=1 $(PY) bench/real.py --out $(DEMO)/real --resolution 512 -- $(DEMO_REAL_FLAGS)

# the paper's question on real photographs: fine, fine + coarse, coarse labels (bench/real_styles.py)
DEMO_REAL_STYLES_FLAGS ?= --iters 60 --batch 4 --val-every 30
$(DEMO)/real_styles/table3.json: | $(VENV)
	OMP_NUM_THREADS=1 $(PY) bench/real_styles.py --out $(DEMO)/real_styles -- $(DEMO_REAL_STYLES_FLAGS)

$(DEMO)/report/characterize/characterize.json: | $(VENV)
	$(PY) characterize.py --data-root $(DEMO)/data --cache $(DEMO)/cache --resolution $(DEMO_RESOLUTION) \
		--out $(DEMO)/report/characterize

# Figure 4 of DEMO_FIG4 on its fine test sets, once both seeds are evaluated (an explicit rule: it wins over the
# sweep's pattern rule, and sets no variable its prerequisites would inherit)
$(DEMO_FIG4_JSON): $(DEMO)/runs/$(DEMO_FIG4)/s0/results.json $(DEMO)/runs/$(DEMO_FIG4)/s1/results.json
	$(PY) fig4.py $(DEMO)/runs/$(DEMO_FIG4) --test IDR,DDR,MES --data-root $(DEMO)/data --cache $(DEMO)/cache \
		-o $@ --members 2 --bn both --bn-batches 20 --device cpu

# both styles of one conditioned model on one test photograph
$(DEMO_STYLE_MAPS): $(DEMO)/runs/$(DEMO_COND)/cond-s0/results.json
	@mkdir -p $(DEMO)/style_photo && cp "$$(ls "$(DEMO)/data/IDRiD/A. Segmentation/1. Original Images/b. Testing Set/"*.jpg \
		| head -1)" $(DEMO)/style_photo/
	for s in fine coarse; do $(PY) predict.py --ckpt $(DEMO)/runs/$(DEMO_COND)/cond-s0/best.pt \
		--images $(DEMO)/style_photo --style $$s --out $(DEMO)/report/style_maps/$$s --device cpu || exit 1; done
	touch $@

clean-demo:  ## remove demo/
	rm -rf $(DEMO)
