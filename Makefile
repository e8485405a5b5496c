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

.PHONY: all build test unit race fuzz-short lint bench demo vm clean deps

all: build

# The version ploop-csi reports (--version, GetPluginInfo).
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo devel)

build:
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o $(BIN)/ ./cmd/...

# Everything CI proves: lint, unit + interop tests on the host, short fuzzing,
# and the kernel-facing tests, which boot a VM from test/e2e.
test: lint unit race fuzz-short

unit:
	$(GO) test -count=1 -timeout 40m ./...

# The race detector over the packages a long-lived node plugin runs
# concurrently, in short mode. Skipped here, run once without -race by `unit`:
# the VM tests (TestKernel, one per package; the host tests drive the same
# image and server code concurrently through qemu, libnbd and our own
# clients), and TestStackCrash, whose children run single-threaded offline
# stack operations to be killed. Race-built children would each sleep 1 s
# at exit.
RACE_PKGS := ./pkg/ploop ./pkg/nbd ./pkg/simfs ./pkg/serving ./pkg/uring
race:
	GORACE=atexit_sleep_ms=0 $(GO) test -race -short -count=1 -timeout 30m \
	  -skip '^TestKernel$$|^TestStackCrash$$' $(RACE_PKGS)

fuzz-short:
	./test/fuzz.sh $(FUZZTIME)

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null; git ls-files --others --exclude-standard '*.go' 2>/dev/null)); \
	  if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) run honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION) ./...

bench:
	./test/bench/run.sh

# The CSI lifecycle through the real driver's gRPC API, printed step by step
# (test/e2e/demo); in the test VM when this kernel lacks nbd or quota.
demo: build
	$(GO) build -o $(BIN)/ ./test/e2e/cmd/csidemo ./test/e2e/cmd/vmrun
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
