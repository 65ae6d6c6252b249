# Shared by .ci/dev and .ci/test: install what is missing, loudly.

# ensure_debian_packages COMMAND:PACKAGE ... — install PACKAGE when COMMAND is not on PATH.
ensure_debian_packages() {
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || missing+=("${pair##*:}")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    echo "missing Debian packages: ${missing[*]} — install them with: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
  echo "== installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# ensure_venv SPEC — a virtualenv in .venv with the project installed (editable) with SPEC's extras.
ensure_venv() {
  if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv" >&2
    python3 -m venv .venv
  fi
  echo "== installing mxgate into .venv" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check -e "$1"
}
