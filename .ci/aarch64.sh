#!/usr/bin/env bash
# The cpp backend on aarch64, without an aarch64 machine: Debian's cross compiler builds the extension, and
# qemu-user runs Debian's arm64 Python with PyPI's aarch64 torch wheel, under the CPU that QEMU_CPU names.
#
#   bash .ci/aarch64.sh                  tests/test_cpp.py whole, on a NEON-only CPU and on one with 256-bit SVE,
#                                        then the variant chosen on five CPUs
#   bash .ci/aarch64.sh --quick          a subset (AARCH64_QUICK below)
#   bash .ci/aarch64.sh -- ARGS...       pytest ARGS instead (with the same environment), once per CPU
#   AARCH64_CPUS="max,sve256=on" ...     the QEMU_CPU models to run (space-separated)
#
# Installs what is missing and leaves what is there (idempotent; run as root, as CI is): Debian's
# qemu-user-static, g++-aarch64-linux-gnu and ninja-build; arm64 Debian packages of Python 3.11 unpacked
# into $AARCH64_ROOT/sysroot (nothing of the host's packages changes: the arm64 python3.11 cannot be
# installed beside the amd64 one); the aarch64 wheels of torch==2.13.0 (with the CUDA libraries it is
# linked against, which it loads even on a CPU), numpy and pytest into that sysroot's dist-packages; the
# binfmt_misc entry that lets an aarch64 process start aarch64 subprocesses (the variant tests do). The
# extension is then built in place (ms_fused/_C.cpython-311-aarch64-linux-gnu.so, beside the host's).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
ROOT=${AARCH64_ROOT:-$REPO/.aarch64}
SYSROOT=$ROOT/sysroot
SITE=$SYSROOT/usr/local/lib/python3.11/dist-packages
PY=$SYSROOT/usr/bin/python3.11
HOST_PY=${HOST_PY:-python3}
# NEON only (Neoverse N1: Graviton 2), and SVE at 256 bits (Graviton 3 class). Not older cores: PyPI's torch
# itself stops on a Cortex-A72 (an illegal instruction in a float64 matrix product).
CPUS=${AARCH64_CPUS:-"neoverse-n1 max,sve256=on"}
# the variant choice, parity on every variant the CPU runs, both modes, the sparse update, the threads; not the
# widest case of the sparse-tile sweep (D = 300, a third of the subset's time under emulation)
AARCH64_QUICK=(-k "(variant or extension_is_built or float32 or reference_mode_float64 or sparse_tile or threads) and not 300-1.75")

MODE=full
PYTEST_ARGS=()
case "${1:-}" in
  --quick) MODE=quick ;;
  --) shift; MODE=args; PYTEST_ARGS=("$@") ;;
  "") ;;
  *) echo "usage: $0 [--quick | -- PYTEST_ARGS...]" >&2; exit 2 ;;
esac

step() { echo "aarch64: $* ($SECONDS s)"; }

# ---- host tools --------------------------------------------------------------------------------------
apt_updated=0
apt_update() { [ $apt_updated = 1 ] || { apt-get update -qq; apt_updated=1; }; }
missing=()
for tool in qemu-aarch64-static:qemu-user-static aarch64-linux-gnu-g++:g++-aarch64-linux-gnu ninja:ninja-build; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "installing ${missing[*]}"
  apt_update
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# ---- Debian's arm64 Python, unpacked into the sysroot -----------------------------------------------
if [ ! -x "$PY" ]; then
  step "unpacking Debian's arm64 Python 3.11 into $SYSROOT"
  dpkg --print-foreign-architectures | grep -qx arm64 || { dpkg --add-architecture arm64; apt_updated=0; }
  apt-cache show python3.11-minimal:arm64 >/dev/null 2>&1 || apt_updated=0
  apt_update
  # the runtime closure (arm64 packages only) and the headers of libpython3.11-dev without its own closure
  mapfile -t debs < <(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
      --no-replaces --no-enhances python3.11-minimal:arm64 libpython3.11-stdlib:arm64 libstdc++6:arm64 \
      | grep -E '^[a-z0-9].*:arm64$' | grep -vE '^(dpkg|tar|install-info|perl-base):' | sort -u)
  rm -rf "$ROOT/debs" "$SYSROOT"
  mkdir -p "$ROOT/debs" "$SYSROOT"
  (cd "$ROOT/debs" && apt-get download -qq -o APT::Sandbox::User=root "${debs[@]}" libpython3.11-dev:arm64)
  for deb in "$ROOT"/debs/*.deb; do dpkg-deb -x "$deb" "$SYSROOT"; done
fi
export QEMU_LD_PREFIX=$SYSROOT  # the dynamic loader and shared libraries of aarch64 programs
# qemu-user looks up every absolute path in QEMU_LD_PREFIX first, and passes the host's /proc/cpuinfo and
# sysfs through otherwise: torch's CPU detection crashes (SIGSEGV at import) on x86's /proc/cpuinfo, and
# oneDNN finds no MIDR_EL1. These stand-ins describe a Neoverse N1 per host core (the identification only: the
# features that code acts on come from the auxiliary vector, which qemu fills for the emulated CPU).
for ((core = 0; core < $(nproc); core++)); do
  printf 'processor\t: %d\nBogoMIPS\t: 100.00\nFeatures\t: fp asimd cpuid\nCPU implementer\t: 0x41\n' $core
  printf 'CPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n'
  ident=$SYSROOT/sys/devices/system/cpu/cpu$core/regs/identification
  mkdir -p "$ident"
  echo 0x00000000413fd0c1 > "$ident/midr_el1"
  echo 0x0000000000000000 > "$ident/revidr_el1"
done > "$ROOT/cpuinfo"
mkdir -p "$SYSROOT/proc" && mv "$ROOT/cpuinfo" "$SYSROOT/proc/cpuinfo"

# ---- binfmt_misc: the kernel hands aarch64 executables to qemu (subprocess.Popen(sys.executable)) ------
BINFMT=/proc/sys/fs/binfmt_misc
[ -e $BINFMT/register ] || mount -t binfmt_misc binfmt_misc $BINFMT 2>/dev/null || true
if [ ! -e $BINFMT/qemu-aarch64 ]; then
  if [ -w $BINFMT/register ]; then
    step "registering qemu-aarch64 with binfmt_misc"
    cat /usr/lib/binfmt.d/qemu-aarch64.conf > $BINFMT/register
  else
    echo "aarch64: binfmt_misc cannot be set up here (needs root and $BINFMT): aarch64 subprocesses would" \
         "fail; register /usr/lib/binfmt.d/qemu-aarch64.conf and rerun" >&2
    exit 1
  fi
fi

# ---- the aarch64 wheels ------------------------------------------------------------------------------
if [ ! -f "$SITE/.ms_fused-wheels" ]; then
  step "installing the aarch64 wheels of torch==2.13.0, numpy and pytest"
  platforms=()
  for minor in $(seq 17 28); do platforms+=(--platform "manylinux_2_${minor}_aarch64"); done
  rm -rf "$SITE"
  "$HOST_PY" -m pip install -q --disable-pip-version-check --target "$SITE" --only-binary=:all: \
      --python-version 3.11 --implementation cp --abi cp311 "${platforms[@]}" --platform manylinux2014_aarch64 \
      --platform linux_aarch64 torch==2.13.0 numpy pytest
  touch "$SITE/.ms_fused-wheels"
fi

# ---- the extension, cross-compiled -------------------------------------------------------------------
# setup.py runs on the arm64 Python (so torch's include and library paths are the aarch64 wheel's) and calls
# the cross compiler, with the sysroot's Python headers first (sysconfig names /usr/include/python3.11, which
# the compiler, a host program, would read from the host; Debian's pyconfig.h there includes
# <aarch64-linux-gnu/python3.11/pyconfig.h>)
export CC=aarch64-linux-gnu-gcc CXX=aarch64-linux-gnu-g++
export PYTHONPATH=$REPO PYTHONDONTWRITEBYTECODE=1
SO=ms_fused/_C.cpython-311-aarch64-linux-gnu.so
if [ ! -f $SO ] || [ -n "$(find csrc setup.py -newer $SO -type f | head -1)" ]; then
  step "building $SO"
  MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" setup.py -q build_ext --inplace -t build/aarch64-temp \
      -I "$SYSROOT/usr/include/python3.11:$SYSROOT/usr/include"
fi
[ -f $SO ] || { echo "aarch64: the extension was not built (see above)" >&2; exit 1; }

# ---- the tests, once per CPU model -------------------------------------------------------------------
case $MODE in
  full) PYTEST_ARGS=(tests/test_cpp.py) ;;
  quick) PYTEST_ARGS=(tests/test_cpp.py "${AARCH64_QUICK[@]}") ;;
esac
for cpu in $CPUS; do
  step "QEMU_CPU=$cpu: pytest ${PYTEST_ARGS[*]}"
  QEMU_CPU=$cpu "$PY" -m pytest -q -p no:cacheprovider "${PYTEST_ARGS[@]}"
done
[ $MODE = args ] && { step "done"; exit 0; }

# The variant each CPU gets (simd_aarch64.h), as PyTorch chooses its own (test_cpp.py compares the two)
for choice in neoverse-n1:default "max,sve=off":default "max,sve128=on":sve128 "max,sve256=on":sve256 \
              "max,sve512=on":default; do
  cpu=${choice%:*} want=${choice##*:}
  # --quick: the CPUs the subset ran on are left out here (its variant tests compared their choice with PyTorch's)
  if [ $MODE = quick ] && [[ " $CPUS " == *" $cpu "* ]]; then continue; fi
  got=$(QEMU_CPU=$cpu "$PY" -c "from ms_fused.engine.cpp import backend as cpp_backend; print(cpp_backend.cpu_capability())")
  echo "aarch64: QEMU_CPU=$cpu runs the $got variant"
  [ "$got" = "$want" ] || { echo "aarch64: expected the $want variant on QEMU_CPU=$cpu" >&2; exit 1; }
done
QEMU_CPU="max,sve128=on" "$PY" -m pytest -q -p no:cacheprovider tests/test_cpp.py -k "widest_the_cpu_runs"
step "done"
