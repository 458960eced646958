// A real ArqonBus dev mesh for the SDK's integration tests: `arqonbus dev` with 3 NATS nodes
// (JetStream R3) and 2 gateways on 127.0.0.1, in a fresh data directory.
//
//   const mesh = await startMesh({ env: { ARQONBUS_MSG_RATE_PER_CONN: "20" } });
//   mesh.urls          // ["ws://127.0.0.1:P/ws", "ws://127.0.0.1:P+1/ws"]
//   mesh.gatewayPids   // from the banner
//   await mesh.killGateway(0)   // SIGKILL, then waits until the process is gone
//   await mesh.metric(0, 'arqonbus_rate_limited_total{scope="upgrade"}')
//   await mesh.stop()           // SIGINT (gateways drain, NATS stops), SIGKILL after 30 s
//
// Only processes this module started are signalled: the dev process (its own process group)
// and, if it does not stop in time, its descendants by PID.

import { spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import readline from "node:readline";
import { fileURLToPath } from "node:url";

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const REPO = path.resolve(HERE, "../../../..");
const VENV_BIN = path.join(REPO, ".venv", "bin");
const BANNER_END = "Ctrl-C stops everything.";
const GATEWAY_LINE = /gateway:\s+(ws:\/\/\S+)\s+\(pid (\d+)\)/;
const STDERR_KEEP = 16_000;

/** Every mesh still running, stopped hard if the test process exits without stopping it. */
const running = new Set();
process.on("exit", () => {
  for (const mesh of running) mesh.killNow();
});

/** First of `count` consecutive free ports on 127.0.0.1, below the ephemeral range. */
export function freePortRun(count, avoid = []) {
  const code =
    "import sys, json\n" +
    "from arqonbus_server.mesh.local import free_port_run\n" +
    "print(free_port_run(int(sys.argv[1]), avoid=json.loads(sys.argv[2])))\n";
  const out = spawnSync(
    path.join(VENV_BIN, "python"),
    ["-c", code, String(count), JSON.stringify(avoid)],
    { encoding: "utf8", timeout: 30_000 },
  );
  if (out.status !== 0) {
    throw new Error(`free_port_run failed (${out.status}): ${out.stderr}`);
  }
  return Number(out.stdout.trim());
}

function range(first, count) {
  return Array.from({ length: count }, (_, i) => first + i);
}

/** Alive and not a zombie. */
export function isRunning(pid) {
  let stat;
  try {
    stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
  } catch {
    return false;
  }
  const state = stat.slice(stat.lastIndexOf(")") + 2).split(" ")[0];
  return state !== "Z" && state !== "X";
}

/** PIDs of every live descendant of `root` (walks /proc's parent links). */
function descendants(root) {
  const children = new Map();
  for (const entry of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = fs.readFileSync(`/proc/${entry}/stat`, "utf8");
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      if (!children.has(ppid)) children.set(ppid, []);
      children.get(ppid).push(Number(entry));
    } catch {
      // gone meanwhile
    }
  }
  const found = [];
  const stack = [root];
  while (stack.length) {
    for (const child of children.get(stack.pop()) ?? []) {
      found.push(child);
      stack.push(child);
    }
  }
  return found;
}

/** Resolves when `pid` is gone (or a zombie), rejects after `timeoutMs`. */
export async function waitGone(pid, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  while (isRunning(pid)) {
    if (Date.now() > deadline) throw new Error(`process ${pid} still running after ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, 25)); // a poll interval, not a sync point
  }
}

function signalGroup(pgid, signal) {
  try {
    process.kill(-pgid, signal);
    return true;
  } catch {
    return false;
  }
}

function signalPid(pid, signal) {
  try {
    process.kill(pid, signal);
  } catch {
    // gone already
  }
}

/**
 * Start `arqonbus dev` (3 NATS nodes, 2 gateways) and wait for its banner.
 * `env`: extra environment (the gateways inherit it), e.g. rate limits.
 */
export async function startMesh({ env = {}, gateways = 2, natsNodes = 3, timeoutMs = 90_000 } = {}) {
  const port = freePortRun(gateways);
  const natsPort = freePortRun(natsNodes, range(port, gateways));
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), "arqonbus-js-it-"));
  const childEnv = { ...process.env, ...env };
  for (const name of ["ARQONBUS_AUTH", "ARQONBUS_TLS_CERT", "ARQONBUS_TLS_KEY"]) {
    if (!(name in env)) delete childEnv[name];
  }
  const args = [
    "dev",
    "--nats-nodes", String(natsNodes),
    "--gateways", String(gateways),
    "--port", String(port),
    "--nats-port", String(natsPort),
    "--data-dir", path.join(dataDir, "mesh"),
  ];
  const proc = spawn(path.join(VENV_BIN, "arqonbus"), args, {
    cwd: dataDir,
    env: childEnv,
    detached: true, // its own process group
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stderr = "";
  proc.stderr.setEncoding("utf8");
  proc.stderr.on("data", (chunk) => {
    stderr = (stderr + chunk).slice(-STDERR_KEEP);
  });
  const stdoutLines = [];
  const exited = new Promise((resolve) => proc.once("exit", (code, signal) => resolve({ code, signal })));
  let exitInfo = null;
  exited.then((info) => {
    exitInfo = info;
  });

  const mesh = {
    port,
    natsPort,
    dataDir,
    proc,
    urls: [],
    httpUrls: [],
    gatewayPids: [],
    stdoutLines,
    stderrTail: (chars = 4000) => stderr.slice(-chars),
    killNow() {
      // Synchronous last resort (process exit): the group, then every descendant by PID.
      let pids = [];
      try {
        pids = descendants(proc.pid);
      } catch {
        // /proc not readable
      }
      signalGroup(proc.pid, "SIGKILL");
      for (const pid of pids) signalPid(pid, "SIGKILL");
      running.delete(mesh);
    },
    async killGateway(index) {
      const pid = mesh.gatewayPids[index];
      process.kill(pid, "SIGKILL");
      await waitGone(pid, 10_000);
    },
    /** A counter's value from gateway `index`'s /metrics (0 when absent). */
    async metric(index, series) {
      const response = await fetch(`${mesh.httpUrls[index]}/metrics`);
      const text = await response.text();
      let total = 0;
      for (const line of text.split("\n")) {
        if (line.startsWith(series + " ")) total += Number(line.slice(series.length + 1));
      }
      return total;
    },
    async stop() {
      if (!running.has(mesh)) return;
      const pids = descendants(proc.pid);
      if (exitInfo === null) {
        signalGroup(proc.pid, "SIGINT");
        const timer = new Promise((resolve) => {
          const t = setTimeout(() => resolve("timeout"), 30_000);
          exited.then(() => clearTimeout(t));
        });
        if ((await Promise.race([exited, timer])) === "timeout") {
          signalGroup(proc.pid, "SIGKILL");
          await exited;
        }
      }
      const left = pids.filter(isRunning);
      for (const pid of left) signalPid(pid, "SIGKILL");
      running.delete(mesh);
      fs.rmSync(dataDir, { recursive: true, force: true });
      return { exit: exitInfo, leftovers: left };
    },
  };
  running.add(mesh);

  const rl = readline.createInterface({ input: proc.stdout });
  const banner = new Promise((resolve, reject) => {
    rl.on("line", (line) => {
      stdoutLines.push(line);
      const match = GATEWAY_LINE.exec(line);
      if (match) {
        mesh.urls.push(match[1]);
        mesh.gatewayPids.push(Number(match[2]));
      }
      if (line.includes(BANNER_END)) resolve();
    });
    exited.then(({ code, signal }) => reject(new Error(`arqonbus dev exited (code ${code}, signal ${signal}) before its banner`)));
    proc.once("error", reject);
  });
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no banner within ${timeoutMs} ms`)), timeoutMs);
  });
  try {
    await Promise.race([banner, timeout]);
  } catch (error) {
    // Give the last stderr chunks a moment to arrive (bounded), then report them.
    await Promise.race([exited, new Promise((resolve) => setTimeout(resolve, 500))]);
    const tail = mesh.stderrTail();
    await mesh.stop().catch(() => {});
    throw new Error(
      `mesh start failed: ${error.message}\nstdout:\n${stdoutLines.join("\n")}\nstderr tail:\n${tail}`,
    );
  } finally {
    clearTimeout(timer);
  }
  mesh.httpUrls = mesh.urls.map((url) => url.replace(/^ws:/, "http:").replace(/\/ws$/, ""));
  if (mesh.urls.length !== gateways || !mesh.urls.every((u) => u.startsWith("ws://127.0.0.1:"))) {
    await mesh.stop();
    throw new Error(`unexpected banner:\n${stdoutLines.join("\n")}`);
  }
  return mesh;
}
