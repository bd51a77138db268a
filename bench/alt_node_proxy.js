// The Node.js alternative: a round-robin balancer on http-proxy.
//
//   node alt_node_proxy.js --port N --backends 127.0.0.1:A,127.0.0.1:B,... [--keepalive] [--max-sockets N]
//
// Without --keepalive it is the common "seed style":
// httpProxy.createProxyServer({}) with no agent, so http-proxy opens a new
// upstream connection per request (and sends "Connection: close" upstream).
// With --keepalive it passes new http.Agent({keepAlive: true, maxSockets}),
// so upstream connections are pooled and reused.
"use strict";

const http = require("http");
const httpProxy = require("http-proxy");

function arg(name, dflt) {
  const i = process.argv.indexOf("--" + name);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : dflt;
}

const port = parseInt(arg("port", "0"), 10);
const keepalive = process.argv.includes("--keepalive");
const maxSockets = parseInt(arg("max-sockets", "64"), 10);
const targets = arg("backends", "")
  .split(",")
  .filter((s) => s)
  .map((s) => "http://" + s);
if (targets.length === 0) {
  console.error("no --backends given");
  process.exit(2);
}

const options = {};
if (keepalive) {
  options.agent = new http.Agent({ keepAlive: true, maxSockets: maxSockets });
}
const proxy = httpProxy.createProxyServer(options);

proxy.on("error", (err, req, res) => {
  if (res && res.writeHead && !res.headersSent) {
    res.writeHead(502, { "Content-Type": "text/plain" });
  }
  if (res && res.end) {
    res.end("502 Bad Gateway: " + err.message + "\n");
  }
});

let next = 0;
const server = http.createServer((req, res) => {
  const target = targets[next];
  next = (next + 1) % targets.length;
  proxy.web(req, res, { target: target });
});

server.listen(port, "127.0.0.1", () => {
  console.log(
    "listening " + server.address().port + (keepalive ? " (keep-alive agent)" : " (no agent)")
  );
});

function stop() {
  server.close();
  process.exit(0);
}
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
