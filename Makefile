# flowtag build. `make` builds the BPF object, its skeleton and the Swift products.
SHELL := /bin/bash
SWIFT ?= swift
CLANG ?= clang
BPFTOOL ?= bpftool
ARCH := $(shell uname -m | sed 's/x86_64/x86/; s/aarch64/arm64/')
CONFIG ?= debug
BPF_BUILD := .build-bpf
GEN := Sources/CFlowTagBPF/generated
BPF_SRC := $(wildcard bpf/*.bpf.c)
BPF_HDR := $(wildcard bpf/include/*.h)
PREFIX ?= /usr/local

.PHONY: all build bpf test test-unit test-kernel bench clean deps run install uninstall

all: build

deps:
	scripts/install-deps.sh

$(BPF_BUILD)/vmlinux.h:
	@mkdir -p $(BPF_BUILD)
	$(BPFTOOL) btf dump file /sys/kernel/btf/vmlinux format c > $@.tmp && mv $@.tmp $@

$(BPF_BUILD)/flowtag.bpf.o: $(BPF_SRC) $(BPF_HDR) $(BPF_BUILD)/vmlinux.h
	$(CLANG) -target bpf -g -O2 -Wall -Wno-default-const-init-var-unsafe -Wno-unknown-warning-option \
		-D__TARGET_ARCH_$(ARCH) -I$(BPF_BUILD) -Ibpf/include -c bpf/flowtag.bpf.c -o $(BPF_BUILD)/flowtag.tmp.o
	# link step strips DWARF; BTF stays for CO-RE
	$(BPFTOOL) gen object $@ $(BPF_BUILD)/flowtag.tmp.o

$(GEN)/flowtag.skel.h: $(BPF_BUILD)/flowtag.bpf.o
	@mkdir -p $(GEN)
	$(BPFTOOL) gen skeleton $< name flowtag_bpf > $@.tmp && mv $@.tmp $@
	@# SwiftPM does not track the generated header: make the shim rebuild
	touch Sources/CFlowTagBPF/shim.c

bpf: $(GEN)/flowtag.skel.h

build: bpf
	$(SWIFT) build -c $(CONFIG)

test: deps
	scripts/test.sh

bench:
	scripts/bench.sh $(BENCH)

bench-%:
	scripts/bench.sh $*

run: deps build
	scripts/run-agent.sh $(ARGS)

install: build
	install -D -m 0755 .build/$(CONFIG)/flowtagd $(DESTDIR)$(PREFIX)/bin/flowtagd
	install -D -m 0755 .build/$(CONFIG)/flowtag $(DESTDIR)$(PREFIX)/bin/flowtag

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/flowtagd $(DESTDIR)$(PREFIX)/bin/flowtag

clean:
	rm -rf $(BPF_BUILD) $(GEN) .build
