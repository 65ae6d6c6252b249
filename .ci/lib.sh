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

# ensure_venv SPEC [DIR [PYTHON]] — a virtualenv in DIR (default .venv, made by PYTHON, default python3)
# with the project installed (editable) with SPEC's extras.
ensure_venv() {
  local dir=${2:-.venv} python=${3:-python3}
  if [ ! -x "$dir/bin/python" ]; then
    echo "== creating $dir with $("$python" --version 2>&1) ($python)" >&2
    "$python" -m venv "$dir"
  fi
  echo "== installing mxgate into $dir" >&2
  "$dir/bin/python" -m pip install -q --disable-pip-version-check -e "$1"
}
