# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
LISTEN_INVENTORY ?= 127.0.0.1:8001
INVENTORY_DB ?= var/inventory.db
CONFIG ?= routes.yaml

.PHONY: venv run run-shop test check lint typecheck pytest bench lock clean

venv: $(STAMP)

# Reinstalled only when the dependency declarations change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Inventory and gateway in the foreground; Ctrl-C (or SIGTERM) stops both cleanly.
run: venv
	@mkdir -p var
	@echo "gateway on http://$${GATEWAY_LISTEN:-127.0.0.1:8080}; the inventory route needs the development API key:"
	@echo "  curl -H 'X-API-Key: dev-inventory-key' http://$${GATEWAY_LISTEN:-127.0.0.1:8080}/api/inventory/devices"
	@trap 'kill -TERM $$inv $$gw 2>/dev/null; wait' INT TERM; \
	$(PY) -m inventory --db $(INVENTORY_DB) --listen $(LISTEN_INVENTORY) & inv=$$!; \
	$(PY) -m gateway --config $(CONFIG) & gw=$$!; \
	wait

# The shop example (README, "Composing services"): products, payments and orders services on
# :8101-8103 and a gateway on :8080 with examples/shop/routes.yaml; Ctrl-C stops all four.
# var/shop-orders.pid holds the orders service's pid, to stop it and watch an order undone.
run-shop: venv
	@mkdir -p var
	@echo "shop on http://$${GATEWAY_LISTEN:-127.0.0.1:8080}/api/shop/orders (README: the walk-through)"
	@trap 'kill -TERM $$products $$payments $$orders $$gw 2>/dev/null; wait' INT TERM; \
	$(PY) -m examples.shop products --listen 127.0.0.1:8101 & products=$$!; \
	$(PY) -m examples.shop payments --listen 127.0.0.1:8102 & payments=$$!; \
	$(PY) -m examples.shop orders --listen 127.0.0.1:8103 & orders=$$!; \
	echo $$orders > var/shop-orders.pid; \
	$(PY) -m gateway --config examples/shop/routes.yaml & gw=$$!; \
	wait

lint: venv
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

typecheck: venv
	$(VENV)/bin/mypy

pytest: venv
	$(PY) -m pytest -q

# What CI runs: lint, type-check, then the whole suite.
test: lint typecheck pytest

check: test

bench: venv
	$(PY) bench/run.py

lock: venv
	{ echo '# Tested versions: `make` installs with `pip install -c constraints.txt`. Regenerate with `make lock`.'; \
	  $(PY) -m pip freeze --exclude-editable; } > constraints.txt

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache
