# Shared helpers for the scripts (sourced, not run).
softhsm_module() {
  for p in /usr/lib/softhsm/libsofthsm2.so /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so; do
    [ -e "$p" ] && { echo "$p"; return 0; }
  done
  echo "SoftHSM module not found: run scripts/setup" >&2
  return 1
}
