# make setup       create .venv with pinned dependencies (CPU torch unless TORCH says otherwise)
# make synthesize  text -> out.wav on the default tiny model, with per-stage times and RTF
# make test        the test suite (CPU; GPU / TensorRT tests skip with a reason)
# make engines     export + fp32/fp16/int8 artifacts (+ TensorRT plans where TensorRT is installed)
# make report      RTF comparison report (reports/<model>-<gpu>-<date>/: report.md, report.json, plots)
# make serve       the OpenAI-compatible speech server on HOST:PORT (MODEL, DEVICE, BACKEND)

PYTHON ?= python3
TORCH  ?= torch==2.13.0
VENV   := .venv
BIN    := $(VENV)/bin
MODEL  ?= cosyvoice3-tiny
TEXT   ?= Hello! This is a quick test of the speech pipeline. It runs every stage on the CPU.
OUT    ?= out.wav
DEVICE ?= cpu
BACKENDS ?= torch,ort
BACKEND ?= torch
HOST   ?= 127.0.0.1
PORT   ?= 8000
STAMP  := $(VENV)/.installed

.PHONY: setup synthesize test engines report serve clean

setup: $(STAMP)

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $(STAMP)

synthesize: setup
	$(BIN)/python -m runtime.synthesize --model $(MODEL) --text "$(TEXT)" --out $(OUT) --device $(DEVICE)

test: setup
	$(BIN)/python -m pytest

engines: setup
	$(BIN)/python -m export build --model $(MODEL) --precision fp32,fp16,int8 --trt

report: setup
	test -f engines/$(MODEL)/manifest.json || $(BIN)/python -m export onnx --model $(MODEL)
	$(BIN)/python -m runtime.report --model $(MODEL) --device $(DEVICE) --backends $(BACKENDS)

serve: setup
	$(BIN)/python -m runtime.serve --model $(MODEL) --device $(DEVICE) --backend $(BACKEND) --host $(HOST) --port $(PORT)

clean:
	rm -rf engines/*/ reports/*.tmp .pytest_cache
