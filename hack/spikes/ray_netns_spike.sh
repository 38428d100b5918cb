#!/usr/bin/env bash
# Spike: one Ray cluster per set of "pods", each pod = its own network namespace (+ private /tmp via mount ns).
# Not part of CI.  Usage (root):
#   ray_netns_spike.sh net-up   CLUSTER         # CLUSTER=1|2 -> netns spk<C>-h, spk<C>-w1, spk<C>-w2
#   ray_netns_spike.sh head     CLUSTER         # ray start --head (daemonizes), private /tmp
#   ray_netns_spike.sh worker   CLUSTER N       # ray start --block in the background, own process group
#   ray_netns_spike.sh driver   CLUSTER         # 2-worker gloo TorchTrainer from the head pod, checkpoints to $STORAGE
#   ray_netns_spike.sh exec     CLUSTER POD CMD...  # run CMD in that pod (POD=h|w1|w2), e.g. ray status --address=10.250.0.11:6379
#   ray_netns_spike.sh down                     # kill everything started here, delete netns/veths/bridge/dirs
set -euo pipefail
# Env every pod gets (see docs/notes/ray-in-pods.md): HOME=/tmp (private), RAY_AUTH_MODE=disabled,
# GRPC_DNS_RESOLVER=native (gRPC's c-ares resolver does not resolve the hosts-file service name here).
BR=spkbr0; GW=10.250.0.1; PFX=24
ROOT=/var/tmp/spk            # per-pod private /tmp lives at $ROOT/<pod>/tmp
STORAGE=/var/tmp/spk-storage  # shared by all pods: must NOT be under the pod-private /tmp
VENV=/work/main/.venv
pods() { echo "spk$1-h spk$1-w1 spk$1-w2"; }
ip_of() { local c=$1 p=$2; case $p in h) echo 10.250.0.${c}1;; w1) echo 10.250.0.${c}2;; w2) echo 10.250.0.${c}3;; esac; }

net_up() {
  local c=$1
  ip link show $BR >/dev/null 2>&1 || { ip link add $BR type bridge; ip addr add $GW/$PFX dev $BR; ip link set $BR up; }
  # bridged traffic must not be dropped by br_netfilter
  for p in h w1 w2; do
    local ns=spk$c-$p ipaddr; ipaddr=$(ip_of $c $p)
    ip netns add $ns
    ip link add v$ns type veth peer name eth0 netns $ns
    ip link set v$ns master $BR up
    ip -n $ns addr add $ipaddr/$PFX dev eth0
    ip -n $ns link set lo up; ip -n $ns link set eth0 up
    ip -n $ns route add default via $GW
    mkdir -p /etc/netns/$ns $ROOT/$ns/tmp $STORAGE
    chmod 1777 $ROOT/$ns/tmp
    printf '127.0.0.1 localhost\n%s %s\n%s ray-head.ns%s.svc.cluster.local\n' \
      "$ipaddr" "$ns" "$(ip_of $c h)" "$c" > /etc/netns/$ns/hosts
    echo "$ns" > /etc/netns/$ns/hostname
  done
}

# Run "$@" inside pod $1: its netns (ip netns exec also gives a fresh, slave mount ns and /etc/hosts),
# then a private UTS ns with hostname=pod name (k8s-like; /etc/hosts maps it to the pod IP, gloo needs that),
# then bind-mount the pod's private dir over /tmp and the shared storage back in.
in_pod() {
  local ns=$1; shift
  ip netns exec $ns env -u RAY_ADDRESS HOME=/tmp RAY_AUTH_MODE=${RAY_AUTH_MODE-disabled} GRPC_DNS_RESOLVER=${GRPC_DNS_RESOLVER-native} PATH=$VENV/bin:$PATH POD_IP=$(ip -n $ns -4 -o addr show eth0 | awk '{print $4}' | cut -d/ -f1) \
    unshare --mount --uts --propagation private -- sh -c '
      hostname '"$ns"' && mount --bind '"$ROOT/$ns/tmp"' /tmp
      exec "$@"' sh "$@"
}

write_driver() { mkdir -p $ROOT; cat > $ROOT/driver.py <<'PY'
import os, sys, tempfile, time
t0 = time.time()
import ray, torch
import ray.train
from ray.train import ScalingConfig, RunConfig, Checkpoint
from ray.train.torch import TorchTrainer, TorchConfig, prepare_model

def loop(cfg):
    import torch.distributed as dist
    ctx = ray.train.get_context()
    model = prepare_model(torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    for epoch in range(2):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
        t = torch.tensor([float(ctx.get_world_rank())]); dist.all_reduce(t)
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if ctx.get_world_rank() == 0:
                torch.save(model.state_dict(), os.path.join(d, "model.pt")); ckpt = Checkpoint.from_directory(d)
            ray.train.report({"epoch": epoch, "loss": loss.item(), "allreduce": t.item(),
                              "host_ip": ray.util.get_node_ip_address(), "backend": dist.get_backend(),
                              "master": os.environ.get("MASTER_ADDR", "?") + ":" + os.environ.get("MASTER_PORT", "?")},
                             checkpoint=ckpt)

ray.init(address=sys.argv[1], logging_level="WARNING")   # explicit IP:port, never "auto" (see notes)
t1 = time.time()
print("nodes:", [(n["NodeManagerAddress"], n["Resources"].get("CPU")) for n in ray.nodes() if n["Alive"]])
trainer = TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                       torch_config=TorchConfig(backend="gloo"),
                       run_config=RunConfig(name=os.environ.get("RUN", "spike"), storage_path=os.environ["STORAGE"]))
res = trainer.fit()
print("metrics:", res.metrics)
print("checkpoint:", res.checkpoint)
print(f"timing: import+init {t1-t0:.1f}s fit {time.time()-t1:.1f}s")
PY
}

case ${1:-} in
  net-up) net_up $2 ;;
  head) c=$2; mkdir -p $ROOT/logs   # like the operator's head pod: ray start --head (daemonizes) && exec <driver>; here the driver is a sleep
    setsid bash -c "$(declare -f in_pod); ROOT=$ROOT STORAGE=$STORAGE VENV=$VENV; in_pod spk$c-h sh -c 'ray start --head --port=6379 --num-cpus=0 --node-ip-address=\$POD_IP --dashboard-port=8265 --dashboard-host=0.0.0.0 --temp-dir=/tmp/ray --disable-usage-stats && exec sleep infinity'" \
      > $ROOT/logs/spk$c-h.log 2>&1 < /dev/null &
    echo "head spk$c-h pgid/pid $!" ;;
  worker) c=$2 n=$3; mkdir -p $ROOT/logs
    setsid bash -c "$(declare -f in_pod); ROOT=$ROOT STORAGE=$STORAGE VENV=$VENV; in_pod spk$c-w$n sh -c 'exec ray start --address=ray-head.ns$c.svc.cluster.local:6379 --num-cpus=1 --node-ip-address=\$POD_IP --node-manager-port=6380 --temp-dir=/tmp/ray --disable-usage-stats --block'" \
      > $ROOT/logs/spk$c-w$n.log 2>&1 < /dev/null &
    echo "worker spk$c-w$n pgid/pid $!" ;;
  driver) c=$2; write_driver; in_pod spk$c-h env STORAGE=$STORAGE RUN=c$c python $ROOT/driver.py 10.250.0.${c}1:6379 ;;
  exec) c=$2 p=$3; shift 3; in_pod spk$c-$p "$@" ;;
  down)
    for ns in $(ip netns list | awk '{print $1}' | grep '^spk[0-9]-'); do
      for pid in $(ip netns pids $ns); do kill -KILL $pid 2>/dev/null || true; done
      ip netns del $ns; rm -rf /etc/netns/$ns
    done
    ip link del $BR 2>/dev/null || true
    rm -rf $ROOT $STORAGE ;;
  *) sed -n 2,10p "$0"; exit 2 ;;
esac
