# ploop-csi developer entry points. `make test` is what CI runs (.ci/run).
GO        ?= go
BIN       := bin
STATICCHECK_VERSION := v0.8.2
# Per-target fuzzing time inside `make test`; run longer by hand with
# `go test -run='^$$' -fuzz=FuzzName ./pkg/...`.
FUZZTIME  ?= 5s
# The command `make vm` runs in the test VM. The VM is tuned by environment:
# PLOOP_CSI_VM_MEM=4096 (MiB), PLOOP_CSI_VM_CPUS=2, PLOOP_CSI_VM_ACCEL=tcg|kvm.
CMD       ?= uname -a

.PHONY: all build test unit fuzz-short lint bench demo vm clean deps

all: build

# The version ploop-csi reports (--version, GetPluginInfo).
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo devel)

build:
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o $(BIN)/ ./cmd/...

# Everything CI proves: lint, unit + interop tests on the host, short fuzzing,
# and the kernel-facing tests, which boot a VM from test/e2e.
test: lint unit fuzz-short

unit:
	$(GO) test -count=1 -timeout 40m ./...

fuzz-short:
	./test/fuzz.sh $(FUZZTIME)

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null; git ls-files --others --exclude-standard '*.go' 2>/dev/null)); \
	  if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) run honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION) ./...

bench:
	./test/bench/run.sh

demo: build
	./test/demo.sh

# Run one command as root inside the test VM (real kernel with nbd and quota);
# vmrun exits with the command's status (make reports it as "Error N"; 125 means
# the harness itself failed).
vm: export VMRUN_CMD = $(CMD)
vm: build
	$(GO) build -o $(BIN)/vmrun ./test/e2e/cmd/vmrun
	$(BIN)/vmrun -- sh -c "$$VMRUN_CMD"

deps:
	./.ci/deps

clean:
	rm -rf $(BIN)
