#!/usr/bin/env bash
# Starts and stops a grove cluster over ssh on a list of hosts.
#
#   deploy/ssh.sh up --hosts "gpu0 cpu1 cpu2" --config exp.toml [--port 7070] [--state DIR]
#   deploy/ssh.sh status --state DIR
#   deploy/ssh.sh down --state DIR [--timeout 30]
#
# Placement: the coordinator, the replay store and the learner run on the
# first host; rollout workers and verifiers are spread round-robin over the
# other hosts (over the first one too when it is the only host). Counts come
# from the config's [cluster] section unless --rollout/--verifier/--learner/
# --replay say otherwise. Every actor is started as
#   grove run ROLE --id ROLE-N --coordinator tcp://FIRST_HOST:PORT --config DIR/config.toml
# in the background (setsid nohup; output to DIR/logs/ROLE-N.log on its host).
#
# Requirements on every host: the grove binary at the path --grove names (the
# same path everywhere; default: the one next to this script's build, else
# `grove` on PATH), ssh login without a password prompt, and the coordinator's
# port reachable from the other hosts. The config is copied to DIR on each
# host. Nothing restarts a crashed actor here (use `grove up` on one machine,
# or Slurm/Kubernetes, for supervision); `status` shows which ones died.
#
# The state directory (local; default runs/ssh-<time>) keeps what `down`
# needs: settings.env and actors.tsv (host, id, pid). The remote run
# directory is the same path on every host (--remote_dir to change it).
# On the first host DIR/cluster.json names the coordinator, so
# `grove status --run_dir DIR` and `grove logs ROLE --run_dir DIR` work there.
# Remote scripts are written in single quotes on purpose (they expand there).
# shellcheck disable=SC2016
set -euo pipefail

usage() {
  sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'EOF'
up flags:
  --hosts "H1 H2 ..."     hosts (user@host works); the first runs coordinator, learner, replay
  --config FILE           experiment config (TOML)
  --port N                coordinator port on the first host (default 7070)
  --advertise HOST        address the other hosts reach the first one at (default: its name)
  --state DIR             local state directory (default runs/ssh-<UTC time>)
  --remote_dir DIR        run directory on the hosts (default: the state directory's absolute path)
  --grove PATH            grove binary on the hosts
  --rollout N --verifier N --learner N --replay N   actor counts (default: [cluster] of the config)
  --program ROLE=PATH     run PATH --role= --id= --coordinator= --config= --run_dir= for ROLE
  --ssh "CMD"             ssh command with options (default "ssh -o BatchMode=yes")
down flags:
  --state DIR  --timeout SECONDS (default 30: then SIGKILL)
EOF
}

die() { echo "ssh.sh: $*" >&2; exit 2; }

cmd="${1:-}"
[ -n "$cmd" ] || { usage >&2; exit 2; }
shift
case "$cmd" in -h|--help|help) usage; exit 0 ;; up|down|status) ;; *) die "unknown command '$cmd' (up, status, down)";; esac

script_dir="$(cd "$(dirname "$0")" && pwd)"
hosts="" config="" port=7070 advertise="" state="" remote_dir="" timeout=30
grove_bin=""
ssh_cmd="ssh -o BatchMode=yes"
declare -A count=() program=()
while [ $# -gt 0 ]; do
  flag="$1"
  [ $# -ge 2 ] || die "$flag needs a value"
  case "$flag" in
    --hosts) hosts="$2" ;;
    --config) config="$2" ;;
    --port) port="$2" ;;
    --advertise) advertise="$2" ;;
    --state) state="$2" ;;
    --remote_dir) remote_dir="$2" ;;
    --grove) grove_bin="$2" ;;
    --timeout) timeout="$2" ;;
    --ssh) ssh_cmd="$2" ;;
    --rollout|--verifier|--learner|--replay) count[${flag#--}]="$2" ;;
    --program)
      [[ "$2" == *=* ]] || die "--program wants ROLE=PATH, got '$2'"
      program[${2%%=*}]="${2#*=}" ;;
    *) die "unknown flag $flag (see --help)" ;;
  esac
  shift 2
done

# One ssh connection per host, reused by every later call (a fresh login
# costs about a second on a loaded machine): OpenSSH connection sharing,
# closed by itself a minute after the last use.
ssh_mux=(-o ControlMaster=auto -o "ControlPath=${TMPDIR:-/tmp}/grove-ssh-%C" -o ControlPersist=60)
read -r -a ssh_argv <<<"$ssh_cmd"
ssh_argv+=("${ssh_mux[@]}")
# Runs a shell command on a host; the command is one word for the remote shell.
on() {
  local host="$1"
  shift
  "${ssh_argv[@]}" "$host" "$*"
}
q() { printf '%q' "$1"; }

if [ "$cmd" = up ]; then
  [ -n "$hosts" ] || die "--hosts is required (e.g. --hosts \"gpu0 cpu1\")"
  [ -n "$config" ] || die "--config is required"
  [ -r "$config" ] || die "cannot read config $config"
  [[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] || die "bad --port $port"
  read -r -a host_list <<<"$hosts"
  first="${host_list[0]}"
  [ -n "$advertise" ] || advertise="${first#*@}"
  if [ -z "$grove_bin" ]; then
    if [ -x "$script_dir/../build/bin/grove" ]; then
      grove_bin="$(cd "$script_dir/../build/bin" && pwd)/grove"
    else
      grove_bin="grove"
    fi
  fi
  [ -n "$state" ] || state="runs/ssh-$(date -u +%Y%m%d-%H%M%S)"
  mkdir -p "$state"
  state="$(cd "$state" && pwd)"
  [ -n "$remote_dir" ] || remote_dir="$state"
  if [ -e "$state/actors.tsv" ]; then die "$state already holds a cluster (ssh.sh down --state $state first)"; fi

  # Counts: flags, else [cluster] of the config (role = N lines in that table).
  for role in replay learner rollout verifier; do
    if [ -z "${count[$role]:-}" ]; then
      count[$role]="$(awk -v role="$role" '
        /^[ \t]*\[/ { in_cluster = ($0 ~ /^[ \t]*\[cluster\][ \t]*(#.*)?$/) ; next }
        in_cluster && $0 ~ "^[ \t]*" role "[ \t]*=" {
          sub(/#.*/, ""); sub(/^[^=]*=[ \t]*/, ""); gsub(/[ \t]/, ""); print; exit }' "$config")"
      count[$role]="${count[$role]:-0}"
    fi
    [[ "${count[$role]}" =~ ^[0-9]+$ ]] || die "bad count for $role: '${count[$role]}'"
  done

  {
    printf 'ssh_cmd=%q\nfirst=%q\nadvertise=%q\nport=%q\nremote_dir=%q\ngrove_bin=%q\n' \
      "$ssh_cmd" "$first" "$advertise" "$port" "$remote_dir" "$grove_bin"
  } >"$state/settings.env"

  # One ssh call per host (a login costs a round trip and, with a heavy
  # shell profile, seconds): each gets the config on stdin and a script that
  # starts its actors detached (setsid nohup, output to logs/<id>.log) and
  # prints "started ID PID" for each.
  coordinator="tcp://$advertise:$port"
  declare -A script=() roles_on=()
  add() {  # add HOST ROLE ID ARGV...
    local host="$1" role="$2" id="$3" words=""
    shift 3
    for w in "$@"; do words+=" $(q "$w")"; done
    script[$host]+="launch $(q "$id")$words"$'\n'
    roles_on[$host]+=" $id:$role"
  }
  # Actors that serve (replay, learner weights, verifiers) bind the address
  # other hosts reach their host at: its IPv4 address as this machine
  # resolves the name (ZeroMQ binds addresses, not names).
  address_of() {
    local name="${1#*@}"
    if [[ "$name" =~ ^[0-9.]+$ ]]; then echo "$name"; return; fi
    getent ahostsv4 "$name" | awk '{ print $1; exit }'
  }
  actor() {
    local host="$1" role="$2" id="$3"
    if [ -n "${program[$role]:-}" ]; then
      add "$host" "$role" "$id" "${program[$role]}" "--role=$role" "--id=$id" \
        "--coordinator=$coordinator" "--config=$remote_dir/config.toml" "--run_dir=$remote_dir"
      return
    fi
    local bind=()
    if [ "$role" != rollout ]; then
      local address
      address="$(address_of "$host")"
      [ -n "$address" ] || die "cannot resolve $host to an IPv4 address for $id to bind"
      bind=("--bind=tcp://$address:0")
    fi
    add "$host" "$role" "$id" "$grove_bin" run "$role" "--id=$id" \
      "--coordinator=$coordinator" "--config=$remote_dir/config.toml" "--run_dir=$remote_dir" \
      "${bind[@]}"
  }

  # The first host: the coordinator (waited for: the others register with
  # it), then the replay store and the learner.
  add "$first" coordinator coordinator "$grove_bin" run coordinator --id=coordinator \
    "--bind=tcp://0.0.0.0:$port" "--config=$remote_dir/config.toml" "--run_dir=$remote_dir" \
    "--endpoint_file=$remote_dir/coordinator.endpoint"
  script[$first]+='for i in $(seq 300); do [ -s coordinator.endpoint ] && break; sleep 0.1; done
if [ ! -s coordinator.endpoint ]; then
  echo "the coordinator did not start within 30 s; its log:"; tail -n 20 logs/coordinator.log; exit 1
fi
echo "metrics $(cat coordinator.metrics 2>/dev/null)"
'
  for role in replay learner; do
    for ((i = 0; i < count[$role]; i++)); do actor "$first" "$role" "$role-$i"; done
  done
  workers=("${host_list[@]:1}")
  [ ${#workers[@]} -gt 0 ] || workers=("$first")
  n=0
  for role in verifier rollout; do
    for ((i = 0; i < count[$role]; i++)); do
      actor "${workers[$((n % ${#workers[@]}))]}" "$role" "$role-$i"
      n=$((n + 1))
    done
  done

  : >"$state/actors.tsv"
  metrics=""
  order=("$first")
  for h in "${workers[@]}"; do
    [[ " ${order[*]} " == *" $h "* ]] || order+=("$h")
  done
  for h in "${order[@]}"; do
    [ -n "${script[$h]:-}" ] || continue
    prelude="set -e
mkdir -p $(q "$remote_dir/logs")
cat > $(q "$remote_dir/config.toml")
cd $(q "$remote_dir")
"
    [ "$h" = "$first" ] && prelude+="rm -f coordinator.endpoint coordinator.metrics"$'\n'
    prelude+='launch() { id=$1; shift; setsid nohup "$@" >> "logs/$id.log" 2>&1 < /dev/null & echo "started $id $!"; }'$'\n'
    set +e
    out="$(on "$h" "$prelude${script[$h]}" <"$config" 2>&1)"
    code=$?
    set -e
    # Record what did start, even when something after it failed: down stops it.
    while read -r word id pid _; do
      [ "$word" = started ] || continue
      role=""
      for e in ${roles_on[$h]}; do [ "${e%%:*}" = "$id" ] && role="${e#*:}"; done
      printf '%s\t%s\t%s\t%s\n' "$h" "$role" "$id" "$pid" >>"$state/actors.tsv"
      echo "ssh.sh: $id on $h pid $pid"
    done <<<"$out"
    if [ "$h" = "$first" ]; then metrics="$(sed -n 's/^metrics //p' <<<"$out")"; fi
    if [ $code -ne 0 ]; then
      if [ ! -s "$state/actors.tsv" ]; then rm -f "$state/actors.tsv"; fi
      [ $code -eq 255 ] && die "cannot reach $h over ssh ($ssh_cmd $h): $out"
      echo "ssh.sh: starting actors on $h failed:" >&2
      grep -v '^started ' <<<"$out" >&2 || true
      echo "ssh.sh: stop what did start with: $0 down --state $state" >&2
      exit 1
    fi
  done

  # cluster.json on the first host: `grove status`/`grove logs --run_dir` work
  # there. Only that host's pids are listed (the others are not its processes).
  pids_json=""
  while IFS=$'\t' read -r h role id pid; do
    if [ "$h" = "$first" ]; then pids_json+="${pids_json:+, }\"$id\": $pid"; fi
  done <"$state/actors.tsv"
  metrics_url=""
  if [ -n "$metrics" ]; then metrics_url="http://$metrics/metrics"; fi
  printf '{"name": "ssh", "run_dir": "%s", "coordinator": "%s", "launcher": "", "metrics": "%s", "pids": {%s}, "ready": true}\n' \
    "$remote_dir" "$coordinator" "$metrics_url" "$pids_json" |
    on "$first" "cat > $(q "$remote_dir/cluster.json.tmp") && mv $(q "$remote_dir/cluster.json.tmp") $(q "$remote_dir/cluster.json")"
  echo "ssh.sh: cluster up: coordinator $coordinator${metrics:+, metrics on $first at $metrics}"
  echo "  $0 status --state $state    |    $0 down --state $state"
  exit 0
fi

# status / down: read what `up` recorded.
[ -n "$state" ] || die "--state DIR is required"
[ -r "$state/settings.env" ] && [ -r "$state/actors.tsv" ] || die "$state holds no cluster started by ssh.sh up"
# shellcheck source=/dev/null
source "$state/settings.env"
read -r -a ssh_argv <<<"$ssh_cmd"
ssh_argv+=("${ssh_mux[@]}")

if [ "$cmd" = status ]; then
  on "$first" "$(q "$grove_bin") status --coordinator $(q "tcp://127.0.0.1:$port")"
  exit $?
fi

# down: workers first (they hand back their prompts), then the learner (it
# checkpoints on SIGTERM), the replay store, and the coordinator last, so
# every exit is still recorded. Each stage: SIGTERM, wait, SIGKILL after
# --timeout. A pid is only signalled while its command line still names the
# actor's id (the process may be gone and the pid reused). One ssh call per
# host and step: the workers' hosts in parallel, then each host's remaining
# stages in order in one call (up puts all of them on the first host).
[[ "$timeout" =~ ^[0-9]+$ ]] || die "bad --timeout $timeout"
# The remote side: stop_stage "PID:ID ..." prints "stopped N killed K".
stop_fn='ours() { tr "\0" " " < /proc/$1/cmdline 2>/dev/null | grep -q -- "--id=$2 "; }
stop_stage() {
  live=""
  for e in $1; do ours "${e%%:*}" "${e#*:}" && live="$live $e"; done
  for e in $live; do kill -TERM "${e%%:*}" 2>/dev/null || true; done
  n=0; left=$live
  while [ -n "$left" ] && [ $n -lt '"$((timeout * 10))"' ]; do
    sleep 0.1; n=$((n + 1)); next=""
    for e in $left; do ours "${e%%:*}" "${e#*:}" && next="$next $e"; done
    left=$next
  done
  k=0
  for e in $left; do kill -KILL "${e%%:*}" 2>/dev/null && k=$((k + 1)); done
  echo "stopped $(echo $live | wc -w) killed $k"
}
'
# stage_of ROLE: 0 workers, 1 learner, 2 replay, 3 coordinator.
stage_of() {
  case "$1" in rollout|verifier) echo 0 ;; learner) echo 1 ;; replay) echo 2 ;; *) echo 3 ;; esac
}
declare -A worker_stage=() late_stages=()
while IFS=$'\t' read -r h role id pid; do
  st="$(stage_of "$role")"
  if [ "$st" = 0 ]; then
    worker_stage[$h]+=" $pid:$id"
  else
    late_stages[$h]+=" $st:$pid:$id"
  fi
done <"$state/actors.tsv"
results="$(mktemp -d)"
trap 'rm -rf "$results"' EXIT
n=0
for h in "${!worker_stage[@]}"; do
  on "$h" "$stop_fn stop_stage '${worker_stage[$h]}'" >"$results/$n" 2>&1 \
    || echo "ssh.sh: cannot reach $h to stop:${worker_stage[$h]}" >&2 &
  n=$((n + 1))
done
wait
for h in "${!late_stages[@]}"; do
  calls=""
  for st in 1 2 3; do
    group=""
    for e in ${late_stages[$h]}; do
      if [ "${e%%:*}" = "$st" ]; then group+=" ${e#*:}"; fi
    done
    if [ -n "$group" ]; then calls+="stop_stage '$group'"$'\n'; fi
  done
  on "$h" "$stop_fn$calls" >"$results/$n" 2>&1 || echo "ssh.sh: cannot reach $h to stop:${late_stages[$h]}" >&2
  n=$((n + 1))
done
read -r stopped killed < <(cat "$results"/* 2>/dev/null |
  awk '$1 == "stopped" { s += $2 - $4; k += $4 } END { print s + 0, k + 0 }')
mv "$state/actors.tsv" "$state/actors.stopped.tsv"
# Close the shared ssh connections now rather than a minute from now.
for h in "${!worker_stage[@]}" "${!late_stages[@]}"; do
  "${ssh_argv[@]}" -O exit "$h" >/dev/null 2>&1 || true
done
echo "ssh.sh: down: $stopped processes stopped, $killed needed SIGKILL"
