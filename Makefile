# Flotilla. `make run` starts it all-in-one; `make test` runs every check CI runs.
SHELL := /bin/bash
CARGO ?= cargo
export PATH := $(HOME)/.cargo/bin:$(PATH)
# kvm (hardware) or qemu (TCG emulation). qemu works everywhere, including under nested
# virtualisation where KVM can hang; use `make run VIRT_TYPE=kvm` on real hardware.
VIRT_TYPE ?= qemu
export FLOTILLA_VIRT_TYPE := $(VIRT_TYPE)

.PHONY: run test build ui test-ui bench-ui lint chaos bench-api bench-tenancy bench-boot bench-scale bench-scheduler bench-ipam bench-firewall bench-router bench-storage bench-migration openapi

run:
	scripts/install-deps.sh run
	scripts/build-ui.sh
	$(CARGO) build --release --locked -p flotilla
	scripts/run.sh

test:
	scripts/install-deps.sh test
	scripts/build-ui.sh
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	FLOTILLA_REQUIRE_CLIENTS=1 $(CARGO) nextest run --workspace --locked --profile ci

build:
	scripts/build-ui.sh
	$(CARGO) build --release --locked -p flotilla

# The web UI alone (ui/dist, which the binary embeds); `cd ui && npm run dev` rebuilds on
# change for `flotilla server --ui-dir ui/dist`.
ui:
	scripts/build-ui.sh

# The browser suite alone, against a debug build (make test runs it too).
test-ui: ui
	$(CARGO) build --locked -p flotilla
	cd ui && FLOTILLA_BIN=$(CURDIR)/target/debug/flotilla npm test

# Time to first render of the VM list with 1,000 VMs, and the bundle sizes.
bench-ui: ui
	$(CARGO) build --release --locked -p flotilla
	cd ui && FLOTILLA_BIN=$(CURDIR)/target/release/flotilla node bench/first-render.mjs

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

# The chaos suite at length: rounds of bursts with kill -9 of the server and the agent on real
# libvirt, invariants after each (CHAOS_ROUNDS, default 200; CHAOS_SEED repeats a run; about 8 s
# a round). `make test` runs 3 rounds.
CHAOS_ROUNDS ?= 200
chaos:
	scripts/install-deps.sh test
	CHAOS_ROUNDS=$(CHAOS_ROUNDS) $(CARGO) test --locked -p flotilla --test chaos -- --nocapture

# API latency and throughput on this machine; prints a JSON summary line.
bench-api:
	scripts/install-deps.sh run
	$(CARGO) bench --locked -p flotilla --bench api

# Two real hosts in namespaces, real guests: 20 suspended and 20 live hops, and a drain of 10 VMs.
# The dev profile: the figures are QEMU's and libvirt's time.
bench-migration:
	scripts/install-deps.sh test
	$(CARGO) bench --locked --profile dev -p flotilla --bench migration

# What RBAC, quotas and the audit log cost per request; prints a JSON summary line.
bench-tenancy:
	scripts/install-deps.sh run
	$(CARGO) bench --locked -p flotilla --bench tenancy

# API-accepted -> domain running for 20 tiny VMs on real QEMU, beside raw libvirt define+start.
bench-boot:
	scripts/install-deps.sh test
	$(CARGO) bench --locked -p flotilla --bench boot

# 1,000 simulated nodes, 10,000 VMs with placement rules, until all are Running.
bench-scale:
	scripts/install-deps.sh run
	$(CARGO) bench --locked -p flotilla --bench scale

# The scheduler alone: 5,000 nodes, 10,000 pending VMs with placement rules, real bindings.
bench-scheduler:
	$(CARGO) bench --locked -p flotilla-controllers --bench scheduler

# VM creates with and without a NIC (an address taken by compare-and-swap); prints a JSON line.
bench-ipam:
	$(CARGO) bench --locked -p flotilla-controllers --bench ipam

# Security group rule changes on a node with 1,000 NICs until applied (p50/p99), and the rule
# set's size; in a scratch network namespace (root). Prints a JSON line.
bench-firewall:
	$(CARGO) bench --locked -p flotilla-agent --bench firewall

# TCP throughput (iperf3) through a router namespace against a plain bridged path, in one run
# in scratch namespaces (root); FLOTILLA_BENCH_FIREWALL=1 adds the security group tables.
bench-router:
	scripts/install-deps.sh test
	$(CARGO) bench --locked -p flotilla-dataplane --bench router

# Linked and full clones of a 1 GiB volume in a dir pool, beside cp of the same file; image
# upload against cp; and every backend (dir, NFS, Ceph RBD, iSCSI) on real servers started for
# the run (root). Each prints a JSON line. The times from an API call to the guest seeing a
# volume per backend are printed by the volumes_* tests (make test, or
# cargo nextest run -p flotilla-agent --no-capture -E 'binary(/volumes_/)').
bench-storage:
	scripts/install-deps.sh test
	$(CARGO) bench --locked -p flotilla-storage --bench clones
	$(CARGO) bench --locked -p flotilla-agent --bench upload
	$(CARGO) bench --locked -p flotilla-storage --bench backends

# Rewrites the OpenAPI documents under openapi/ after an API change (a test fails until they are committed).
openapi:
	FLOTILLA_UPDATE_OPENAPI=1 $(CARGO) nextest run -p flotilla-server openapi
