# flowtag build. `make` builds the BPF object, its skeleton and the Swift products.
SHELL := /bin/bash
SWIFT ?= swift
CLANG ?= clang
BPFTOOL ?= bpftool
ARCH := $(shell uname -m | sed 's/x86_64/x86/; s/aarch64/arm64/')
CONFIG ?= debug
BPF_BUILD := .build-bpf
GEN := Sources/CFlowTagBPF/generated
BPF_HDR := $(wildcard bpf/include/*.h bpf/*/*.h)
BPF_CFLAGS := -target bpf -g -O2 -Wall -Wno-default-const-init-var-unsafe -Wno-unknown-warning-option \
	-D__TARGET_ARCH_$(ARCH) -I$(BPF_BUILD) -Ibpf/include -Ibpf
PREFIX ?= /usr/local

.PHONY: all build bpf test test-unit test-kernel bench clean deps run install uninstall image reliability

all: build

deps:
	scripts/install-deps.sh

$(BPF_BUILD)/vmlinux.h:
	@mkdir -p $(BPF_BUILD)
	$(BPFTOOL) btf dump file /sys/kernel/btf/vmlinux format c > $@.tmp && mv $@.tmp $@

# Two objects: the tagging programs (pinned, they outlive an agent) and the relay's
# connect-redirect (held by the agent's links: gone with it).
$(BPF_BUILD)/flowtag.bpf.o: bpf/flowtag.bpf.c $(BPF_HDR) $(BPF_BUILD)/vmlinux.h
	$(CLANG) $(BPF_CFLAGS) -c bpf/flowtag.bpf.c -o $(BPF_BUILD)/flowtag.tmp.o
	# link step strips DWARF; BTF stays for CO-RE
	$(BPFTOOL) gen object $@ $(BPF_BUILD)/flowtag.tmp.o

$(BPF_BUILD)/relay.bpf.o: bpf/relay/relay.bpf.c $(BPF_HDR) $(BPF_BUILD)/vmlinux.h
	$(CLANG) $(BPF_CFLAGS) -c bpf/relay/relay.bpf.c -o $(BPF_BUILD)/relay.tmp.o
	$(BPFTOOL) gen object $@ $(BPF_BUILD)/relay.tmp.o

$(GEN)/flowtag.skel.h: $(BPF_BUILD)/flowtag.bpf.o
	@mkdir -p $(GEN)
	$(BPFTOOL) gen skeleton $< name flowtag_bpf > $@.tmp && mv $@.tmp $@
	@# SwiftPM does not track the generated header: make the shim rebuild
	touch Sources/CFlowTagBPF/lifecycle.c

$(GEN)/relay.skel.h: $(BPF_BUILD)/relay.bpf.o
	@mkdir -p $(GEN)
	$(BPFTOOL) gen skeleton $< name relay_bpf > $@.tmp && mv $@.tmp $@
	touch Sources/CFlowTagBPF/relay.c

bpf: $(GEN)/flowtag.skel.h $(GEN)/relay.skel.h

# B1's floor (bench.py b1floor): the cheapest per-socket stamps, measured alone.
$(BPF_BUILD)/floor.bpf.o: bench/floor.bpf.c $(BPF_BUILD)/vmlinux.h
	$(CLANG) -target bpf -g -O2 -Wall -D__TARGET_ARCH_$(ARCH) -I$(BPF_BUILD) -c $< -o $(BPF_BUILD)/floor.tmp.o
	$(BPFTOOL) gen object $@ $(BPF_BUILD)/floor.tmp.o

build: bpf
	$(SWIFT) build -c $(CONFIG)
	@# The CLI starts for every question (B4): a release CLI is one static executable
	@# (Swift runtime and glibc linked in, not position-independent): no dynamic loader,
	@# nothing relocated at start. It calls no NSS function (users, groups), the one
	@# thing a static glibc program would still load shared libraries for.
	[ "$(CONFIG)" != release ] || $(SWIFT) build -c release --product flowtag -Xswiftc -static-executable

# Everything (root): unit tests, then the real-kernel tests.
test: deps
	scripts/test.sh all

# Pure logic, no root: seconds.
test-unit:
	scripts/test.sh unit

# Real programs, the agent, the relay and the deployment (root).
test-kernel: deps
	scripts/test.sh kernel

# The fault and abuse suite at the scale RELIABILITY.md reports, against the release build.
reliability: deps bpf
	$(SWIFT) build -c release
	$(SWIFT) build --build-tests
	FLOWTAG_BUILD=release FLOWTAG_KILL9_RUNS=$${FLOWTAG_KILL9_RUNS:-10} FLOWTAG_FUZZ_REQUESTS=$${FLOWTAG_FUZZ_REQUESTS:-100000} \
		FLOWTAG_CLI_FUZZ_RUNS=$${FLOWTAG_CLI_FUZZ_RUNS:-1000} $(SWIFT) test --skip-build --filter Reliability

# The DaemonSet's container image (buildah, from scratch): .build/flowtagd-image.tar.
image: deps
	scripts/build-image.sh

bench:
	scripts/bench.sh $(BENCH)

bench-%:
	scripts/bench.sh $*

run: deps build
	scripts/run-agent.sh $(ARGS)

# NOBUILD=1 installs what is already built (used by the tests, which run inside a build).
install: $(if $(NOBUILD),,build)
	install -D -m 0755 .build/$(CONFIG)/flowtagd $(DESTDIR)$(PREFIX)/bin/flowtagd
	install -D -m 0755 .build/$(CONFIG)/flowtag $(DESTDIR)$(PREFIX)/bin/flowtag
	sed 's|/usr/local/bin/flowtagd|$(PREFIX)/bin/flowtagd|' deploy/systemd/flowtagd.service > .build/flowtagd.service
	install -D -m 0644 .build/flowtagd.service $(DESTDIR)/etc/systemd/system/flowtagd.service
	@# the config is the operator's once installed: never overwritten
	[ -e $(DESTDIR)/etc/flowtag/flowtagd.yaml ] || install -D -m 0644 deploy/flowtagd.yaml $(DESTDIR)/etc/flowtag/flowtagd.yaml
	[ -n "$(DESTDIR)" ] || getent group flowtag >/dev/null || groupadd --system flowtag
	[ -n "$(DESTDIR)" ] || ! command -v systemctl >/dev/null || systemctl daemon-reload 2>/dev/null || true

# Removes binaries and the unit; the config (/etc/flowtag) and journal (/var/lib/flowtag) stay.
uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/flowtagd $(DESTDIR)$(PREFIX)/bin/flowtag $(DESTDIR)/etc/systemd/system/flowtagd.service
	[ -n "$(DESTDIR)" ] || ! command -v systemctl >/dev/null || systemctl daemon-reload 2>/dev/null || true

clean:
	rm -rf $(BPF_BUILD) $(GEN) .build
