# The README's commands. Every target installs what is missing first (`setup` is idempotent).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
PYTEST_ARGS ?=
# pytest-xdist workers of `make test` (0: one process). Two fit this project's 2-core machines: most
# end-to-end tests wait on servers, engines and schedulers, and a CPU training uses one core.
TEST_WORKERS ?= 2

.PHONY: setup system-deps demo test lint format lock clean

setup: $(STAMP)

$(STAMP): infra/install_env.sh infra/install_fiftyone.sh requirements/*.txt pyproject.toml
	bash infra/install_env.sh $(VENV)
	bash infra/install_fiftyone.sh $(VENV)-fiftyone
	touch $(STAMP)

# Debian packages for the suite's real engines and servers (Docker, ...): installed when missing.
system-deps:
	bash infra/system_deps.sh

demo: setup
	bash infra/demo.sh

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
# The suite starts a Docker engine where none answers (infra/docker_engine.sh); one it started is
# stopped afterwards, one that was already running is left alone.
test: setup system-deps
	engine_before=$$(bash infra/docker_engine.sh status >/dev/null 2>&1 && echo yes || echo no); \
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS); rc=$$?; \
	if [ $$engine_before = no ]; then bash infra/docker_engine.sh stop; fi; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

# Rewrites the constraints file from the current environment (after changing a pin).
lock: setup
	{ sed -n '1,3p' requirements/constraints.txt; $(VENV)/bin/pip freeze --exclude-editable \
	  | grep -viE '^(segmentation-pipeline|mmcv-lite|pip|setuptools|wheel)=='; } > requirements/constraints.lock.tmp
	mv requirements/constraints.lock.tmp requirements/constraints.txt

clean:
	rm -rf $(VENV) $(VENV)-fiftyone .work demo-output
