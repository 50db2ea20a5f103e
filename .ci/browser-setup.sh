#!/usr/bin/env bash
# Headless Chromium for the MLflow UI browser test (tests/test_mlflow_ui.py): Debian's `chromium` package, driven by
# Playwright from the lock file (its own browser download cannot reach the internet). Exits 0 when Chromium is
# usable, 1 otherwise (saying why); .ci/run then requires the test to run rather than skip.
set -uo pipefail
say() { echo "[browser-setup] $*" >&2; }
if ! command -v chromium >/dev/null; then
  [ "$(id -u)" = 0 ] || { say "not root: cannot apt-get install chromium"; exit 1; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq chromium >/tmp/mmdd-apt-chromium.log 2>&1 \
    || { apt-get update -qq >>/tmp/mmdd-apt-chromium.log 2>&1 && apt-get install -y -qq chromium \
         >>/tmp/mmdd-apt-chromium.log 2>&1; } \
    || { say "apt-get install chromium failed:"; tail -n 5 /tmp/mmdd-apt-chromium.log >&2; exit 1; }
fi
chromium --headless --no-sandbox --disable-gpu --dump-dom about:blank >/dev/null 2>&1 \
  || { say "chromium is installed but does not start headless"; exit 1; }
say "chromium: $(command -v chromium) ($(chromium --version 2>/dev/null))"
