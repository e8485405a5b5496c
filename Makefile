# ploop-csi developer entry points. `make test` is what CI runs (.ci/run).
GO        ?= go
BIN       := bin
STATICCHECK_VERSION := v0.8.2
CONTROLLER_TOOLS_VERSION := v0.19.0
CONTROLLER_GEN := $(GO) run sigs.k8s.io/controller-tools/cmd/controller-gen@$(CONTROLLER_TOOLS_VERSION)
# The custom resources' Go types, and where their generated CRDs go.
API_PATHS := ./pkg/api/...
CRD_DIR   := charts/ploop-csi/crds
# Per-target fuzzing time inside `make test`; run longer by hand with
# `go test -run='^$$' -fuzz=FuzzName ./pkg/...`.
FUZZTIME  ?= 5s
# The command `make vm` runs in the test VM. The VM is tuned by environment:
# PLOOP_CSI_VM_MEM=4096 (MiB), PLOOP_CSI_VM_CPUS=2, PLOOP_CSI_VM_ACCEL=tcg|kvm.
CMD       ?= uname -a

.PHONY: all build test unit race fuzz-short lint generate check-generated bench demo vm clean deps

all: build

# The version ploop-csi reports (--version, GetPluginInfo).
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo devel)

build:
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o $(BIN)/ ./cmd/...

# Everything CI proves: lint, unit + interop tests on the host, short fuzzing,
# and the kernel-facing tests, which boot a VM from test/e2e.
test: lint unit race fuzz-short

# testreport prints what plain go test would, then ends with the failed
# tests and their last lines, where a CI log that keeps only its head and
# tail shows them.
unit:
	$(GO) run ./test/e2e/cmd/testreport -- $(GO) test -json -count=1 -timeout 40m ./...

# The race detector over the packages a long-lived node plugin runs
# concurrently, in short mode. Skipped here, run once without -race by `unit`:
# the VM tests (TestKernel, one per package; the host tests drive the same
# image and server code concurrently through qemu, libnbd and our own
# clients), and TestStackCrash, whose children run single-threaded offline
# stack operations to be killed. Race-built children would each sleep 1 s
# at exit.
RACE_PKGS := ./pkg/ploop ./pkg/flock ./pkg/nbd ./pkg/simfs ./pkg/serving ./pkg/uring ./pkg/nodeagent ./pkg/clustercatalog
race:
	GORACE=atexit_sleep_ms=0 $(GO) test -race -short -count=1 -timeout 30m \
	  -skip '^TestKernel$$|^TestStackCrash$$' $(RACE_PKGS)

fuzz-short:
	./test/fuzz.sh $(FUZZTIME)

# The deep-copy methods and CRD manifests of pkg/api, from its Go types.
generate:
	$(CONTROLLER_GEN) object paths=$(API_PATHS)
	$(CONTROLLER_GEN) crd paths=$(API_PATHS) output:crd:artifacts:config=$(CRD_DIR)

# Fails when the generated files differ from what `make generate` makes now.
check-generated:
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  $(CONTROLLER_GEN) crd paths=$(API_PATHS) output:crd:artifacts:config="$$tmp/crds" && \
	  diff -r "$$tmp/crds" $(CRD_DIR) && \
	  for f in $$(find pkg/api -name zz_generated.deepcopy.go); do cp "$$f" "$$tmp/$$(echo $$f | tr / _)"; done && \
	  $(CONTROLLER_GEN) object paths=$(API_PATHS) && \
	  for f in $$(find pkg/api -name zz_generated.deepcopy.go); do \
	    cmp -s "$$f" "$$tmp/$$(echo $$f | tr / _)" || { cp "$$tmp/$$(echo $$f | tr / _)" "$$f"; echo "$$f is stale: run make generate"; exit 1; }; \
	  done || { echo "generated files differ from pkg/api's types: run make generate"; exit 1; }

lint: check-generated
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
