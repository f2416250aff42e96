#!/usr/bin/env bash
# Set up edgebundle on this device: a venv with the package, then the pinned WasmEdge
# runtime + WASI-NN plugin (`edgebundle install`). Idempotent: run it again at any time.
# Run ./install.sh --help for the options.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: ./install.sh [OPTIONS]

Installs edgebundle into <home>/venv and the pinned WasmEdge + WASI-NN GGML plugin into
<home>/runtime (versioned directories, a `current` link), and writes <home>/env.
Every download resumes, shows progress and is sha256-checked before use: against the
sha256 pinned in the lock, or, where the lock says `verify`, against the release's own
SHA256SUM read over https (the output says which, per file). Where WasmEdge cannot be
downloaded or verified, edgebundle says so and uses its embedded runtime.

Options:
  --home DIR            state directory (default: $EDGEBUNDLE_HOME or ~/.edgebundle)
  --bundle DIR          install offline from a bundle made by `edgebundle bundle build DIR`
  --variant V           plugin variant: auto (default; detects AVX/CUDA), cpu, noavx, cuda-12
  --app NAME            also install this pinned app (e.g. llama-api-server); repeatable
  --model NAME          also install this pinned model; repeatable
  --lock FILE           runtime lock file (default: the one edgebundle ships)
  --pins FILE           app/model pins file (default: the one edgebundle ships)
  --allow-unverified    accept pins with neither a published sha256 nor a SHA256SUM
  --require-wasmedge    fail when WasmEdge cannot be installed (no embedded fallback)
  --no-runtime          skip WasmEdge; install the package (and apps/models) only
  --dev                 editable install of this checkout with test tools (.[dev]),
                        plus redis-server, the wasm32-wasi C toolchain,
                        Chromium with ChromeDriver for the web page tests and
                        docker.io, docker-compose, debootstrap for the container
                        tests (apt)
  --no-embedded         skip the embedded runtime (wasmtime + llama-cpp-python)
  --with-redis          apt-get install redis-server if it is missing (root or sudo)
  --python PY           Python >= 3.11 to build the venv with (default: python3)
  --update-profile      append `. <home>/env` to ~/.bashrc (never done otherwise)
  -h, --help            show this help

Afterwards:  . <home>/env && edgebundle doctor
EOF
}

usage_error() {
  echo "install.sh: $*; see ./install.sh --help" >&2
  exit 2
}

reported=0
doing=""

die() {
  echo "install.sh: error: $*" >&2
  reported=1
  exit 1
}

step() {
  doing="$*"
  echo "==> $*" >&2
}

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
home="${EDGEBUNDLE_HOME:-$HOME/.edgebundle}"
python="python3"
bundle=""
dev=0
with_redis=0
with_toolchain=0
embedded=1
update_profile=0
install_args=()

while [[ $# -gt 0 ]]; do
  arg="$1"
  shift
  value=""
  case "$arg" in
    --*=*)
      value="${arg#*=}"
      arg="${arg%%=*}"
      set -- "$value" "$@"
      ;;
  esac
  case "$arg" in
    --home | --bundle | --variant | --app | --model | --lock | --pins | --python)
      [[ $# -gt 0 && -n "$1" ]] || usage_error "$arg needs a value"
      value="$1"
      shift
      ;;
  esac
  case "$arg" in
    -h | --help) usage; exit 0 ;;
    --home) home="$value" ;;
    --bundle) bundle="$value" ;;
    --python) python="$value" ;;
    --variant | --app | --model | --lock | --pins) install_args+=("$arg" "$value") ;;
    --allow-unverified | --require-wasmedge | --no-runtime) install_args+=("$arg") ;;
    --dev) dev=1 with_redis=1 with_toolchain=1 ;;
    --no-embedded) embedded=0 ;;
    --with-redis) with_redis=1 ;;
    --update-profile) update_profile=1 ;;
    *) usage_error "unknown option $arg" ;;
  esac
done

# ---------------------------------------------------------------- Python

command -v "$python" >/dev/null 2>&1 || die "$python not found; install Python >= 3.11 or pass --python PATH"
if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
  found="$("$python" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo unknown)"
  die "$python is Python $found; edgebundle needs Python >= 3.11 (pass --python PATH)"
fi
"$python" -c 'import venv, ensurepip' 2>/dev/null \
  || die "$python cannot create virtual environments (on Debian/Ubuntu: apt-get install python3-venv)"

if [[ -n "$bundle" ]]; then
  [[ -f "$bundle/bundle.json" ]] || usage_error "$bundle is not a bundle directory (no bundle.json)"
  bundle="$(cd "$bundle" && pwd)"
fi

# ---------------------------------------------------------------- system packages (optional)

apt_packages=()
if [[ $with_redis -eq 1 ]]; then
  if command -v redis-server >/dev/null 2>&1; then
    step "redis-server is already installed"
  else
    apt_packages+=(redis-server)
  fi
fi
# The guest (wasm/edgechat) is C built with clang for wasm32-wasi; tests rebuild it.
wasm_toolchain_works() {
  command -v clang >/dev/null 2>&1 || return 1
  local probe
  probe="$(mktemp -d)"
  printf '#include <stdio.h>\nint main(void) { puts("ok"); return 0; }\n' >"$probe/probe.c"
  clang --target=wasm32-wasi -O2 -o "$probe/probe.wasm" "$probe/probe.c" >/dev/null 2>&1
  local status=$?
  rm -rf -- "$probe"
  return $status
}
if [[ $with_toolchain -eq 1 ]] && ! wasm_toolchain_works; then
  apt_packages+=(clang lld wasi-libc libclang-rt-14-dev-wasm32)
fi
# The container tests (tests/test_containers.py) build images and run them on a real
# Docker engine: dockerd, compose (Debian's docker-compose is v1) and debootstrap for
# the base image, made from Debian packages so nothing comes from a Docker registry.
if [[ $dev -eq 1 ]]; then
  command -v dockerd >/dev/null 2>&1 || apt_packages+=(docker.io)
  command -v docker-compose >/dev/null 2>&1 || apt_packages+=(docker-compose)
  command -v debootstrap >/dev/null 2>&1 || [[ -x /usr/sbin/debootstrap ]] || apt_packages+=(debootstrap)
fi
# The web chat page is tested in a real headless Chromium driven by selenium.
if [[ $with_toolchain -eq 1 ]] && ! command -v chromedriver >/dev/null 2>&1; then
  apt_packages+=(chromium chromium-driver)
fi
if [[ ${#apt_packages[@]} -gt 0 ]]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    die "needs apt-get (Debian/Ubuntu) to install ${apt_packages[*]}; install them with this system's package manager"
  fi
  if [[ $(id -u) -eq 0 ]]; then
    sudo=()
  elif command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
  else
    die "needs root or sudo to run apt-get install ${apt_packages[*]}"
  fi
  step "installing ${apt_packages[*]} (apt-get)"
  ${sudo[@]+"${sudo[@]}"} apt-get update -qq
  ${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_packages[@]}" >/dev/null
fi

# ---------------------------------------------------------------- venv + package

mkdir -p "$home"
home="$(cd "$home" && pwd)"
venv="$home/venv"
created_venv=""

wheels_dir=""
cleanup() {
  local status=$?
  [[ -n "$wheels_dir" ]] && rm -rf -- "$wheels_dir"
  if [[ $status -ne 0 && $reported -eq 0 && -n "$doing" ]]; then
    echo "install.sh: error: $doing failed (exit $status)" >&2
  fi
  if [[ $status -ne 0 && -n "$created_venv" ]]; then
    rm -rf -- "$created_venv"
    echo "install.sh: removed the unfinished $created_venv" >&2
  fi
}
trap cleanup EXIT

if [[ -x "$venv/bin/python" ]]; then
  step "reusing $venv"
else
  step "creating $venv"
  created_venv="$venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
extra=""
[[ $embedded -eq 1 ]] && extra="[embedded]"

if [[ -n "$bundle" ]]; then
  # pip sees only the wheels bundle.json lists, copied out of the bundle and hashed there
  # (what pip reads is what was checked), and installs them by a generated requirements
  # file in --require-hashes mode: a wheel merely lying in DIR/wheels is never a candidate.
  # A bundle installs every wheel it lists (bundle build lists edgebundle[embedded]).
  step "checking the bundle's wheels against $bundle/bundle.json"
  wheels_dir="$(mktemp -d)"
  "$python" - "$bundle" "$wheels_dir" <<'PY'
import hashlib, json, pathlib, re, shutil, sys
root, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
files = json.loads((root / "bundle.json").read_text())["files"]
wheels = {rel: sha for rel, sha in files.items() if rel.startswith("wheels/")}
if not wheels:
    sys.exit(f"install.sh: error: {root} has no wheels; rebuild it without --no-wheels")
pins = {}
for rel, sha in sorted(wheels.items()):
    name = rel[len("wheels/"):]
    parts = name[:-len(".whl")].split("-") if name.endswith(".whl") else []
    if not re.fullmatch(r"[A-Za-z0-9_.+!-]+\.whl", name) or len(parts) not in (5, 6):
        sys.exit(f"install.sh: error: {root}/bundle.json lists {rel!r}, which is not a wheel "
                 "file name; rebuild the bundle")
    copy = out / name
    try:
        shutil.copyfile(root / rel, copy)
    except OSError as exc:
        sys.exit(f"install.sh: error: {root / rel}: {exc.strerror}; rebuild the bundle")
    if hashlib.sha256(copy.read_bytes()).hexdigest() != sha:
        sys.exit(f"install.sh: error: {root / rel}: sha256 mismatch; rebuild the bundle")
    pins.setdefault((parts[0], parts[1]), []).append(sha)
if not any(re.sub(r"[-_.]+", "-", dist).lower() == "edgebundle" for dist, _ in pins):
    sys.exit(f"install.sh: error: {root}/bundle.json lists no edgebundle wheel; rebuild the bundle")
(out / "requirements.txt").write_text("".join(
    f"{dist}=={version} " + " ".join(f"--hash=sha256:{sha}" for sha in shas) + "\n"
    for (dist, version), shas in sorted(pins.items())))
PY
  step "installing edgebundle from $bundle/wheels (offline)"
  "${pip[@]}" install -q --upgrade --no-index --find-links "$wheels_dir" --require-hashes \
    -r "$wheels_dir/requirements.txt"
  rm -rf -- "$wheels_dir"
  wheels_dir=""
elif [[ $dev -eq 1 ]]; then
  step "installing $repo (editable, with the dev extra; llama-cpp-python builds from source the first time: ~3 min)"
  "${pip[@]}" install -q -e "$repo[dev]"
else
  [[ -n "$extra" ]] && step "llama-cpp-python builds from source the first time (~3 min); --no-embedded skips it"
  step "installing $repo$extra"
  "${pip[@]}" install -q "$repo$extra"
fi
"$venv/bin/edgebundle" --version >/dev/null

# ---------------------------------------------------------------- runtime, apps, env file

step "installing the runtime (edgebundle install)"
bundle_args=()
[[ -n "$bundle" ]] && bundle_args=(--bundle "$bundle")
"$venv/bin/edgebundle" --home "$home" install \
  ${bundle_args[@]+"${bundle_args[@]}"} ${install_args[@]+"${install_args[@]}"}

if [[ $update_profile -eq 1 ]]; then
  line=". $(printf '%q' "$home/env")"
  if grep -qxF "$line" "$HOME/.bashrc" 2>/dev/null; then
    step "~/.bashrc already loads $home/env"
  else
    printf '\n# edgebundle\n%s\n' "$line" >>"$HOME/.bashrc"
    step "added '$line' to ~/.bashrc"
  fi
fi

created_venv=""  # finished: the venv is no longer "unfinished"
cat <<EOF

edgebundle is installed in $home. Next:
  . $(printf '%q' "$home/env")
  edgebundle doctor
EOF
