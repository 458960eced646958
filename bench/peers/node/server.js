// Socket.IO (Node) comparison peer for the ArqonBus benchmarks.
//
// App protocol on namespace "/", websocket transport only:
//   join(channel)             -> socket joins room `channel`, gets joined(channel) back
//   publish(channel, payload) -> event(payload) to every socket in room `channel`
//
// Usage: node server.js --host 127.0.0.1 --port P   (prints "READY <port>" once listening)
"use strict";

const http = require("node:http");
const { Server } = require("socket.io");

function parseArgs(argv) {
  const args = { host: "127.0.0.1", port: 0 };
  for (let i = 0; i < argv.length; i++) {
    const key = argv[i];
    const value = argv[i + 1];
    if (key === "--host" && value !== undefined) {
      args.host = value;
      i++;
    } else if (key === "--port" && value !== undefined) {
      args.port = Number.parseInt(value, 10);
      i++;
    } else {
      process.stderr.write(`usage: node server.js --host HOST --port PORT (got ${key})\n`);
      process.exit(2);
    }
  }
  if (!Number.isInteger(args.port) || args.port < 0 || args.port > 65535) {
    process.stderr.write(`invalid --port\n`);
    process.exit(2);
  }
  return args;
}

const args = parseArgs(process.argv.slice(2));
const httpServer = http.createServer((req, res) => {
  res.writeHead(404, { "Content-Type": "text/plain" });
  res.end("not found\n");
});
// Idle-connection runs open tens of thousands of sockets: never time them out at the HTTP layer.
httpServer.keepAliveTimeout = 0;
httpServer.headersTimeout = 0;
httpServer.requestTimeout = 0;

const io = new Server(httpServer, {
  transports: ["websocket"],
  perMessageDeflate: false,
  httpCompression: false,
  maxHttpBufferSize: 1e6,
  serveClient: false,
  // Same as the Python peer: default 25 s ping interval, a generous pong deadline so a
  // server busy fanning out never drops clients that answered.
  pingInterval: 25000,
  pingTimeout: 60000,
});

io.on("connection", (socket) => {
  socket.on("join", (channel) => {
    if (typeof channel !== "string") return;
    socket.join(channel);
    socket.emit("joined", channel);
  });
  socket.on("publish", (channel, payload) => {
    if (typeof channel !== "string") return;
    io.to(channel).emit("event", payload);
  });
});

httpServer.on("error", (err) => {
  process.stderr.write(`listen failed: ${err.message}\n`);
  process.exit(1);
});

httpServer.listen({ host: args.host, port: args.port, backlog: 4096 }, () => {
  process.stdout.write(`READY ${httpServer.address().port}\n`);
});

let stopping = false;
function stop() {
  if (stopping) return;
  stopping = true;
  // io.close() closes every socket and the HTTP server; don't wait for slow peers.
  io.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
