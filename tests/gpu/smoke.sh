#!/usr/bin/env bash
# GPU smoke test: the deploy's own vLLM command serves a GLM-4 architecture model on this host.
# See tests/gpu/README.md. Steps (each may run in a separate call on the same machine):
#
#   smoke.sh facts DIR        record nvidia-smi / lspci / kernel facts into DIR (for the facts tests)
#   smoke.sh stage FILE...    move pieces of the wheel bundle into $STAGE (a host with no network
#                             receives the bundle in pieces of at most 64 MiB)
#   smoke.sh install          join + check the bundle, build the venv the role would, switch `current`
#   smoke.sh model            make the tiny checkpoint of the rendered model's architecture at its model_dir
#   smoke.sh bytecode         compile .pyc for the venv and the host's site-packages (see README)
#   smoke.sh fresh-cache      empty VLLM_CACHE_ROOT and the Triton / inductor caches (cold again)
#   smoke.sh serve DIR        cold start, verify, warm start, verify, bench (serve_smoke.py)
#   smoke.sh all DIR          install, model, serve
#
# Inputs: $RENDERED (default: rendered/ beside this script) as written by render.py on the
# controller; $REPO, the glmfleet checkout (default: two levels up); the wheels, either as a
# bundle in $STAGE (wheels.tar.part-*, checked against $HERE/wheels.tar.sha256) or already
# unpacked in $WHEELS. Runs as root.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=${REPO:-$(cd "$HERE/../.." && pwd)}
RENDERED=${RENDERED:-$HERE/rendered}
WORK=${WORK:-/root/glmfleet-smoke}
STAGE=${STAGE:-$WORK/stage}
WHEELS=${WHEELS:-$WORK/wheels}
PY=${PY:-python3}

log() { printf '[smoke %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

load_rendered() {
    [ -f "$RENDERED/smoke.env" ] || { log "no $RENDERED/smoke.env: run render.py first"; exit 2; }
    # shellcheck disable=SC1091
    . "$RENDERED/smoke.env"
    VENV="$VENV_ROOT/venvs/$VENV_NAME"
}

cmd_facts() {
    local dir=$1; mkdir -p "$dir"
    local -a cmds=(
        "nvidia-smi"
        "nvidia-smi -q"
        "nvidia-smi --query-gpu=index,name,pci.bus_id,driver_version,memory.total,persistence_mode,compute_cap --format=csv,noheader,nounits"
        "nvidia-smi --query-gpu=index,name,pci.bus_id,driver_version,memory.total,persistence_mode,compute_cap --format=csv,noheader"
        "nvidia-smi topo -m"
        "lspci -nn"
        "lspci -nn -d 10de:"
        "uname -r"
        "uname -a"
        "cat /proc/driver/nvidia/version"
        "mokutil --sb-state"
        "cat /etc/os-release"
        "nproc"
        "free -b"
        "python3 --version"
        "python3 -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))'"
    )
    local i=0 c f
    : >"$dir/INDEX"
    for c in "${cmds[@]}"; do
        i=$((i + 1)); f=$(printf '%02d' "$i")
        if bash -c "$c" >"$dir/$f.out" 2>"$dir/$f.err"; then rc=0; else rc=$?; fi
        printf '%s\trc=%s\t%s\n' "$f" "$rc" "$c" >>"$dir/INDEX"
    done
    # What glmfleet's GPU fact itself reads on a host (its own command, rendered by render.py).
    if [ -f "$RENDERED/gpuhost_fact.sh" ]; then
        bash "$RENDERED/gpuhost_fact.sh" >"$dir/gpuhost-fact.out" 2>"$dir/gpuhost-fact.err" || true
    fi
    # Without lspci, the kernel's own view of the PCI devices.
    {
        for d in /sys/bus/pci/devices/*; do
            printf '%s vendor=%s device=%s class=%s\n' "${d##*/}" "$(cat "$d/vendor")" "$(cat "$d/device")" "$(cat "$d/class")"
        done
    } >"$dir/sys-bus-pci.out" 2>&1 || true
    log "facts in $dir: $(wc -l <"$dir/INDEX") commands"
}

cmd_stage() {
    mkdir -p "$STAGE"
    local f
    for f in "$@"; do
        mv -f "$f" "$STAGE/" 2>/dev/null || cp -f "$f" "$STAGE/"
    done
    log "staged: $(cd "$STAGE" && ls -l | awk 'NR>1{printf "%s(%d) ", $9, $5}')"
    df -h "$STAGE" | tail -1 >&2
}

cmd_install() {
    load_rendered
    local t0=$SECONDS
    if compgen -G "$STAGE/wheels.tar.part-*" >/dev/null; then
        log "joining $(ls "$STAGE"/wheels.tar.part-* | wc -l) pieces"
        cat "$STAGE"/wheels.tar.part-* >"$WORK/wheels.tar"
        (cd "$WORK" && sha256sum -c "$HERE/wheels.tar.sha256")
        rm -rf "$WHEELS" && mkdir -p "$WHEELS"
        tar -xf "$WORK/wheels.tar" -C "$WHEELS"
        rm -f "$WORK/wheels.tar" "$STAGE"/wheels.tar.part-*
    fi
    # Every wheel is the one wheels.txt names, byte for byte.
    (cd "$WHEELS" && awk '!/^#/ && NF>=3 {print $3"  "$2}' "$HERE/wheels.txt" | sha256sum -c --quiet)
    log "wheels checked: $(ls "$WHEELS"/*.whl | wc -l) files, $(du -sh "$WHEELS" | cut -f1)"

    # The venv the role builds, at the path the role chose, from this host's python3 (the one
    # with PyTorch): vLLM's own pins (torch 2.11.0, torchvision 0.26.0, torchaudio 2.11.0) are
    # exactly what the host has, so the venv takes them from there instead of downloading 3 GB.
    rm -rf "$VENV" && mkdir -p "$VENV_ROOT/venvs"
    "$PY" -m venv --system-site-packages --without-pip "$VENV"
    if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
        # python3 is itself a venv here: --system-site-packages reaches the base interpreter's
        # packages, not its. A .pth file adds its site-packages after the venv's own.
        local host_site
        host_site=$("$PY" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
        echo "import site; site.addsitedir('$host_site')" >"$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/_glmfleet_host_site.pth"
        log "venv sees the host's site-packages through a .pth: $host_site"
    fi
    "$VENV/bin/python" -c 'import torch, sys; print("venv python", sys.version.split()[0], "torch", torch.__version__, torch.__file__)'
    "$VENV/bin/python" -m pip install --no-index --no-deps --no-compile --no-cache-dir --ignore-installed \
        --disable-pip-version-check -q "$WHEELS"/*.whl
    # The role's own steps: its import check, then its switch of `current`.
    "$VENV/bin/python" -c "$(cat "$RENDERED/import_check.py")" "$VLLM_PACKAGE" "$VLLM_VERSION"
    touch "$VENV/$COMPLETE_MARKER"
    bash -c "$(cat "$RENDERED/switch.sh")"
    ls -l "$VENV_ROOT" >&2
    "$VENV_CURRENT_BIN/python" -c 'import vllm; print("vllm", vllm.__version__, "at", vllm.__file__)'
    log "install done in $((SECONDS - t0)) s"
}

cmd_model() {
    load_rendered
    [ -n "$MODEL_DIR" ] || { log "rendered config has no model_dir"; exit 2; }
    rm -rf "$MODEL_DIR"
    "$VENV_CURRENT_BIN/python" "$HERE/make_tiny_glm.py" "$MODEL_DIR" --architecture "$ARCHITECTURE"
    chmod -R a+rX "$MODEL_DIR" "$(dirname "$MODEL_DIR")"
}

cmd_bytecode() {
    # The unit's user cannot write __pycache__ into the root-owned venv, and this image sets
    # PYTHONDONTWRITEBYTECODE, so without this every start compiles vLLM, torch and
    # transformers from source again (measured: 93 s to ready instead of 53 s, warm).
    load_rendered
    local t0=$SECONDS host_site
    "$VENV/bin/python" -m compileall -q -j 0 "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" >/dev/null || true
    host_site=$("$PY" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
    "$PY" -m compileall -q -j 0 "$host_site" >/dev/null || true
    log "bytecode compiled in $((SECONDS - t0)) s"
}

cmd_fresh_cache() {
    # Back to a cold start: no compile cache, no Triton cache, no compile files in /tmp.
    load_rendered
    rm -rf "$STATE_DIR"/cache/* "$STATE_DIR/.triton" "$STATE_DIR/.cache" /tmp/torchinductor_*
}

cmd_serve() {
    load_rendered
    local out=$1; mkdir -p "$out"
    # What the roles put on the host besides the venv: the service user and its state dirs
    # (vllm_venv), the root-only EnvironmentFile (vllm_service), the verify script (verify).
    local owner=$SERVICE_USER extra=()
    if ! id "$SERVICE_USER" >/dev/null 2>&1 && ! useradd --system --home-dir "$STATE_DIR" --no-create-home \
        --shell /usr/sbin/nologin --user-group "$SERVICE_USER"; then
        log "cannot create user $SERVICE_USER: vLLM runs as root"
        owner=root extra=(--as-root)
    fi
    local d
    for d in "$STATE_DIR" "$STATE_DIR/huggingface" "$STATE_DIR/cache"; do
        install -d -m 750 -o "$owner" -g "$owner" "$d"
    done
    install -d -m 700 "$(dirname "$ENV_FILE")"
    install -m 600 "$RENDERED/vllm.env" "$ENV_FILE"
    install -D -m 755 "$REPO/files/verify_vllm.py" "$VERIFY_SCRIPT"
    cp "$RENDERED/vllm.service" "$out/vllm.service"
    "$PY" "$HERE/serve_smoke.py" --rendered "$RENDERED" --repo "$REPO" --out "$out" "${extra[@]}" "${@:2}"
}

main() {
    local step=${1:-}; shift || true
    case $step in
        facts) cmd_facts "$@" ;;
        stage) cmd_stage "$@" ;;
        install) cmd_install ;;
        model) cmd_model ;;
        bytecode) cmd_bytecode ;;
        fresh-cache) cmd_fresh_cache ;;
        serve) cmd_serve "$@" ;;
        all) cmd_install; cmd_model; cmd_serve "$@" ;;
        *) sed -n '2,18p' "$0"; exit 2 ;;
    esac
}

main "$@"
