// A benchmark backend: node's built-in http only.
//
//   node backend.js --port N [--size BYTES] [--delay-ms MS] [--name NAME]
//
// Answers every request with a fixed text/plain body (keep-alive, with a
// Content-Length).  --size 0 (the default) means the small body
// "hello world!\n" (13 bytes).  --delay-ms adds a fixed delay before each
// response (the "slow backend" case).  GET /__stats answers JSON counters
// {name, connections, requests} (not counted in "requests"), so the bench can
// tell how many upstream connections a proxy opened.
"use strict";

const http = require("http");

function arg(name, dflt) {
  const i = process.argv.indexOf("--" + name);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : dflt;
}

const port = parseInt(arg("port", "0"), 10);
const size = parseInt(arg("size", "0"), 10);
const delayMs = parseInt(arg("delay-ms", "0"), 10);
const name = arg("name", "backend-" + port);

const body = size > 0 ? Buffer.alloc(size, "x") : Buffer.from("hello world!\n");
const headers = {
  "Content-Type": "text/plain",
  "Content-Length": String(body.length),
};

let connections = 0;
let requests = 0;

function answer(res) {
  res.writeHead(200, headers);
  res.end(body);
}

const server = http.createServer((req, res) => {
  if (req.url === "/__stats") {
    const stats = Buffer.from(JSON.stringify({ name, connections, requests }));
    res.writeHead(200, {
      "Content-Type": "application/json",
      "Content-Length": String(stats.length),
    });
    res.end(stats);
    return;
  }
  requests += 1;
  // Drain any request body before answering.
  req.resume();
  if (delayMs > 0) {
    setTimeout(answer, delayMs, res);
  } else {
    answer(res);
  }
});

server.on("connection", () => {
  connections += 1;
});
// Longer than any proxy's idle upstream timeout, so idle pooled connections
// are closed by the proxy, never raced by the backend.
server.keepAliveTimeout = 65000;
server.headersTimeout = 66000;

server.listen(port, "127.0.0.1", () => {
  console.log("listening " + server.address().port);
});

function stop() {
  server.close();
  process.exit(0);
}
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
