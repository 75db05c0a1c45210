#!/usr/bin/env bash
# Installs, from Debian's packages, every program the build, the tests and
# the lab's host side run that this machine lacks. `npm test` runs it first
# (pretest), so the README's two commands are all a fresh machine needs;
# without root it names what is missing and stops.
set -euo pipefail

# Every program the build, the tests and the lab's host side run, and the
# Debian package that has it. A fresh Debian machine lacks some (cpio, xmllint,
# the aarch64 cross tools); install them all rather than rely on the image.
#   g++ make python3      the addon (node-gyp); cc and gcc for the uapi and lab tests
#   binutils              as, objdump: the x86 encoder's byte-for-byte tests
#   binutils-aarch64-linux-gnu  aarch64-linux-gnu-as/objdump/objcopy/nm: the arm64 encoder's
#   gcc-aarch64-linux-gnu libc6-dev-arm64-cross  the arm64 uapi test (arm64 <linux/kvm.h>), the arm64 agent
#   cpio xz-utils         the lab's initramfs and kernel-module tests
#   procps                pgrep, ps: the lab's clean-up tests
#   util-linux            mount (tracefs); unshare: the suite also runs in a PID namespace, as in
#                         a container, where tracefs numbers threads differently from the process
#   libxml2-utils         xmllint: JUnit output against Jenkins' schema
TOOLS=(g++:g++ make:make python3:python3 cc:gcc as:binutils objdump:binutils
  aarch64-linux-gnu-as:binutils-aarch64-linux-gnu aarch64-linux-gnu-objdump:binutils-aarch64-linux-gnu
  aarch64-linux-gnu-objcopy:binutils-aarch64-linux-gnu aarch64-linux-gnu-nm:binutils-aarch64-linux-gnu
  aarch64-linux-gnu-gcc:gcc-aarch64-linux-gnu /usr/aarch64-linux-gnu/include/linux/kvm.h:libc6-dev-arm64-cross
  cpio:cpio xz:xz-utils pgrep:procps ps:procps mount:util-linux unshare:util-linux xmllint:libxml2-utils)
missing=()
for t in "${TOOLS[@]}"; do
  need=${t%%:*} pkg=${t#*:}
  if [[ $need == /* ]]; then [[ -e $need ]] && continue; else command -v "$need" >/dev/null && continue; fi
  [[ " ${missing[*]} " == *" $pkg "* ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if ((EUID != 0)); then
    echo "kvmharness tests: missing Debian packages ${missing[*]} (install them as root)" >&2
    exit 1
  fi
  echo "== installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

