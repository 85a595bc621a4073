# Two commands on a fresh machine: `make run` (a server on http://127.0.0.1:8000 with the
# embedded defaults) and `make test` (the whole suite against PostgreSQL and Redis).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum requirements.txt | cut -c1-12)

# The tests run against the real services; override to point elsewhere.
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/test
TEST_REDIS_URL ?= redis://127.0.0.1:6379/0

.PHONY: venv run test lint format services bench bench-codecs token cluster cluster-stop test-faults \
	test-abuse

# The stamp's name holds requirements.txt's hash, so its content alone decides: a newer
# file with the same content (a fresh checkout, a git worktree sharing this .venv) does
# not install again, which reinstalled the client from wherever make ran.
$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	rm -f $(VENV)/.installed-* && touch $(STAMP)

venv: $(STAMP)

run: venv
	DEBUG=1 $(PY) manage.py migrate --no-input
	DEBUG=1 $(PY) manage.py runserver 127.0.0.1:8000

services:
	bash scripts/ensure_services.sh

# mypy (pyproject.toml [tool.mypy]) over the typed packages; its Django plugin loads the
# settings, which need DEBUG (or a SECRET_KEY) to import. The tests, bench/, devtools/,
# scripts/ and the Python client are not typed yet, so mypy does not read them. mypy
# refuses an ignore without its error code; the grep, over every tracked Python file
# (typed or not), one without its reason: `# type: ignore[code]  # why`.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	DEBUG=1 $(VENV)/bin/mypy
	@git grep -nE 'type: ignore(\[[^]]*\])? *$$' -- '*.py'; case $$? in \
		1) ;; 0) echo "lint: a type: ignore above gives no reason"; exit 1;; *) exit 1;; esac
	$(VENV)/bin/lint-imports

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The suite on TEST_WORKERS processes (pytest-xdist), each taking whole test files, so a
# module's server nodes start once; `TEST_WORKERS=0` runs it in this one process.
TEST_WORKERS ?= 2
test: venv services lint
	DEBUG=1 DATABASE_URL=$(TEST_DATABASE_URL) REDIS_URL=$(TEST_REDIS_URL) \
	REDIS_PREFIX=pushtest$$$$ $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Fault tests against a cluster of their own (nginx, 3 daphne nodes, their own
# redis-server, PostgreSQL behind a TCP proxy): slower, so not part of `make test`.
test-faults: venv services
	DEBUG=1 DATABASE_URL=$(TEST_DATABASE_URL) REDIS_URL=$(TEST_REDIS_URL) \
	REDIS_PREFIX=pushfaults$$$$ $(PY) -m pytest -m faults tests/faults $(PYTEST_ARGS)

# The abuse suite: 50 anonymous attackers against one node with default settings while
# honest clients publish and subscribe; about 2.5 minutes (docs/operations.md).
test-abuse: venv services
	DEBUG=1 DATABASE_URL=$(TEST_DATABASE_URL) REDIS_URL=$(TEST_REDIS_URL) \
	REDIS_PREFIX=pushabuse$$$$ $(PY) -m pytest -m abuse tests/abuse -s $(PYTEST_ARGS)

# N daphne nodes behind nginx on 127.0.0.1:$(CLUSTER_PORT), against DATABASE_URL and
# REDIS_URL (default: the test services); every PID in .cluster/state.json.
N ?= 3
CLUSTER_PORT ?= 8080
cluster: venv services
	DATABASE_URL=$(or $(DATABASE_URL),$(TEST_DATABASE_URL)) \
	REDIS_URL=$(or $(REDIS_URL),$(TEST_REDIS_URL)) \
	$(PY) scripts/cluster.py start --nodes $(N) --port $(CLUSTER_PORT)

cluster-stop:
	$(PY) scripts/cluster.py stop

bench: venv services
	$(PY) -m bench $(BENCH_ARGS)

bench-codecs: venv
	$(PY) -m bench.codecs

# A user with an API token for publishing on the development server: make token USER=alice
token: venv
	DEBUG=1 $(PY) manage.py shell -c "from django.contrib.auth.models import User; User.objects.get_or_create(username='$(USER)')" >/dev/null
	DEBUG=1 $(PY) manage.py grant $(USER) '*' --publish >/dev/null
	DEBUG=1 $(PY) manage.py drf_create_token $(USER)
