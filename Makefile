# Developer entry points for tidemark. `make` (or `make help`) lists them.
#
#   make run ARGS="--consumer me"   daemon + private throw-away Redis
#   REDIS_URL=redis://host:6379 make run   daemon against an existing Redis

CARGO ?= cargo
ARGS ?=
DURATION ?= 30m
BIN := target/release/tidemark

.DEFAULT_GOAL := help
.PHONY: help build run test test-servers lint fmt demo bench soak clean ensure-redis ensure-chromium ensure-prometheus ensure-python3 shellcheck

help: ## List the targets
	@echo "tidemark developer targets:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "} {printf "  make %-15s %s\n", $$1, $$2}'

build: ## cargo build --release (target/release/tidemark)
	$(CARGO) build --release

# run-local.sh installs/starts Redis itself unless REDIS_URL or --redis-url is given.
run: build ## Run the daemon in the foreground with a private Redis (ARGS="..." go to `tidemark run`)
	scripts/run-local.sh $(ARGS)

test: ensure-redis ensure-chromium ensure-prometheus ensure-python3 ## All tests (unit, integration, doc), then the integration subset against the vendored servers; installs Redis, Chromium, Prometheus and Python 3 if missing
	$(CARGO) test --all-targets
	$(CARGO) test --doc
	CARGO="$(CARGO)" scripts/test-servers.sh

test-servers: ensure-redis ## The integration subset against Redis 7.2.6 and Valkey 8.0.1 built from ../shared/vendor (cached under target/servers)
	CARGO="$(CARGO)" scripts/test-servers.sh

lint: ## cargo fmt --check and clippy with -D warnings
	$(CARGO) fmt --all --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt: ## Format the code (cargo fmt --all)
	$(CARGO) fmt --all

demo: ensure-redis build ## Narrated end-to-end scenario against a private Redis
	scripts/demo.sh

# Only the JSON goes to stdout (`make bench > bench.json`): the command is not
# echoed and ensure-redis reports on stderr.
bench: ## Benchmark against a private Redis: JSON on stdout, table on stderr (ARGS="--runs 1 --n 50000")
	@scripts/ensure-redis.sh >&2
	@$(CARGO) bench --bench tidemark -- $(ARGS)

# Rows on stderr, one JSON object per sample on stdout (`make soak > soak.jsonl`).
soak: ## Steady load at half the measured maximum rate for DURATION (30m), memory over time (ARGS="--rate N --sample 30s")
	@scripts/ensure-redis.sh >&2
	@$(CARGO) bench --bench soak -- --duration $(DURATION) $(ARGS)

clean: ## Remove build output (cargo clean)
	$(CARGO) clean

ensure-redis: ## Check for redis-server/redis-cli >= 6.2, install them on Debian/Ubuntu
	@scripts/ensure-redis.sh

ensure-chromium: ## Check for Chromium (the dashboard test's browser), install it on Debian/Ubuntu
	@scripts/ensure-chromium.sh

ensure-prometheus: ## Check for prometheus and promtool (the alert tests), install them on Debian/Ubuntu
	@scripts/ensure-prometheus.sh

ensure-python3: ## Check for python3 (the README's consumer example), install it on Debian/Ubuntu
	@scripts/ensure-python3.sh

shellcheck: ## Check the shell scripts (needs shellcheck)
	shellcheck -x scripts/*.sh .ci/run
