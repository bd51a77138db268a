'use strict';
// A test backend for txbalancer's integration tests, on node's built-in http
// module only (no npm).
//
//     node backend.js [PORT] [MODE]        (or the environment: PORT, MODE)
//
// It listens on 127.0.0.1:PORT (0 picks a free port) and prints
// "listening PORT" with the real port once it accepts connections.
//
// MODE decides how every ordinary path is answered:
//   normal  "Response from server on port N"
//   echo    JSON: method, url (path and query as received), httpVersion,
//           headers as [name, value] pairs in order (req.rawHeaders),
//           bodyLength, bodySha256
//   slow    CHUNKS chunks (default 10), one every INTERVAL_MS (default 300);
//           each chunk is a line "chunk I of N sent_at=MS" (MS: Unix ms)
//   big     BYTES bytes (default 1 GiB) with Content-Length, generated as it
//           is sent (byte at offset i is i % 256), honouring backpressure
//   sink    reads the whole request body (at most RATE bytes/s when RATE is
//           set) and answers JSON {bytes, sha256}
//   delay   waits DELAY_MS (default 2000), then answers like normal
//   close   answers like normal with "Connection: close"
//
// Paths starting with /__ pick a behaviour whatever the mode, with query
// parameters overriding the environment:
//   /__normal /__echo /__close
//   /__slow?chunks=N&interval=MS   /__big?bytes=N   /__sink?rate=BPS
//   /__delay?ms=MS
//   /__status/CODE        an empty answer with that status (204, 304, ...)
//   /__hop                hop-by-hop and repeated headers in the response
//   /__count?prefix=P&host=H   JSON {started, completed, aborted, cancelled}:
//                         requests whose path and query start with P (and
//                         whose Host is H, when given; other processes on a
//                         shared machine may knock on a reused port)
//                         (/__count itself is not counted). "completed": the
//                         whole request body arrived; "aborted": it did not;
//                         "cancelled": the connection closed before the whole
//                         answer was sent; "urls": their targets, in order.
//   /__health             a health endpoint: GET answers the current health
//                         status (200 at start) with a short text body, and
//                         Retry-After: 5 when it is 503. POST (or PUT)
//                         /__health?status=CODE sets that status; it answers
//                         204. Ordinary paths keep being served whatever the
//                         health status is.
//
// The keep-alive timeout is node's default (5 s) unless KEEPALIVE_MS is set.

const http = require('http');
const crypto = require('crypto');

const env = process.env;
const port = parseInt(process.argv[2] || env.PORT || '0', 10);
const mode = process.argv[3] || env.MODE || 'normal';
const num = (value, dflt) =>
  value === undefined || value === null || value === '' ? dflt : Number(value);

const defaults = {
  chunks: num(env.CHUNKS, 10),
  interval: num(env.INTERVAL_MS, 300),
  bytes: num(env.BYTES, 1024 * 1024 * 1024),
  rate: num(env.RATE, 0),
  delay: num(env.DELAY_MS, 2000),
};

const seen = []; // {url, completed, aborted}
let healthStatus = 200;
let actualPort = port;

function text(res, status, body, headers) {
  const buf = Buffer.from(body);
  res.writeHead(status, Object.assign({
    'Content-Type': 'text/plain; charset=utf-8',
    'Content-Length': buf.length,
  }, headers || {}));
  res.end(buf);
}

function greeting() {
  return 'Response from server on port ' + actualPort;
}

function collect(req, done) {
  const hash = crypto.createHash('sha256');
  let length = 0;
  req.on('data', (chunk) => {
    length += chunk.length;
    hash.update(chunk);
  });
  req.on('end', () => done(length, hash.digest('hex')));
}

const handlers = {
  normal(req, res) {
    req.resume();
    text(res, 200, greeting());
  },

  close(req, res) {
    req.resume();
    text(res, 200, greeting(), { Connection: 'close' });
  },

  echo(req, res) {
    collect(req, (length, sha) => {
      const headers = [];
      for (let i = 0; i < req.rawHeaders.length; i += 2) {
        headers.push([req.rawHeaders[i], req.rawHeaders[i + 1]]);
      }
      const body = JSON.stringify({
        port: actualPort,
        method: req.method,
        url: req.url,
        httpVersion: req.httpVersion,
        headers: headers,
        bodyLength: length,
        bodySha256: sha,
      });
      text(res, 200, body, { 'Content-Type': 'application/json' });
    });
  },

  slow(req, res, params) {
    req.resume();
    const chunks = num(params.get('chunks'), defaults.chunks);
    const interval = num(params.get('interval'), defaults.interval);
    res.writeHead(200, { 'Content-Type': 'text/plain' });
    let i = 0;
    const send = () => {
      res.write('chunk ' + i + ' of ' + chunks + ' sent_at=' + Date.now() + '\n');
      i += 1;
      if (i >= chunks) {
        res.end();
      } else {
        timer = setTimeout(send, interval);
      }
    };
    let timer = null;
    res.on('close', () => clearTimeout(timer));
    send();
  },

  big(req, res, params) {
    req.resume();
    const total = num(params.get('bytes'), defaults.bytes);
    const block = Buffer.alloc(65536);
    for (let i = 0; i < block.length; i++) block[i] = i % 256;
    res.writeHead(200, {
      'Content-Type': 'application/octet-stream',
      'Content-Length': total,
    });
    let sent = 0;
    let closed = false;
    res.on('close', () => { closed = true; });
    const pump = () => {
      while (!closed && sent < total) {
        const n = Math.min(block.length, total - sent);
        sent += n;
        const more = res.write(n === block.length ? block : block.subarray(0, n));
        if (!more) {
          res.once('drain', pump);
          return;
        }
      }
      if (!closed) res.end();
    };
    pump();
  },

  sink(req, res, params) {
    const rate = num(params.get('rate'), defaults.rate);
    const started = Date.now();
    let received = 0;
    if (rate > 0) {
      req.on('data', (chunk) => {
        received += chunk.length;
        const ahead = (received / rate) * 1000 - (Date.now() - started);
        if (ahead > 5) {
          req.pause();
          setTimeout(() => req.resume(), ahead);
        }
      });
    }
    collect(req, (length, sha) => {
      text(res, 200, JSON.stringify({ bytes: length, sha256: sha }),
        { 'Content-Type': 'application/json' });
    });
  },

  delay(req, res, params) {
    req.resume();
    const ms = num(params.get('ms'), defaults.delay);
    const timer = setTimeout(() => text(res, 200, greeting()), ms);
    res.on('close', () => clearTimeout(timer));
  },

  status(req, res, params, arg) {
    req.resume();
    const code = parseInt(arg || '200', 10);
    const headers = code === 304 ? { ETag: '"v1"' } : {};
    res.writeHead(code, headers);
    res.end();
  },

  health(req, res, params) {
    req.resume();
    if (req.method === 'POST' || req.method === 'PUT') {
      const code = parseInt(params.get('status') || '200', 10);
      if (!(code >= 200 && code <= 599)) {
        text(res, 400, 'bad status\n');
        return;
      }
      healthStatus = code;
      res.writeHead(204);
      res.end();
      return;
    }
    const headers = healthStatus === 503 ? { 'Retry-After': '5' } : {};
    text(res, healthStatus, 'health ' + healthStatus + '\n', headers);
  },

  hop(req, res) {
    req.resume();
    const body = Buffer.from(greeting());
    // writeHead with an array of pairs keeps repeated headers and their order.
    res.writeHead(200, [
      'Content-Type', 'text/plain',
      'Content-Length', String(body.length),
      'Set-Cookie', 'first=1',
      'X-Rep', 'one',
      'Connection', 'keep-alive, X-Bar',
      'X-Bar', 'hop-by-hop',
      'Keep-Alive', 'timeout=5, max=100',
      'Proxy-Connection', 'keep-alive',
      'Set-Cookie', 'second=2',
      'X-Rep', 'two',
    ]);
    res.end(body);
  },
};

function count(req, res, params) {
  req.resume();
  const prefix = params.get('prefix') || '';
  const host = params.get('host');
  const mine = seen.filter((r) => r.url.startsWith(prefix) && (host === null || r.host === host));
  text(res, 200, JSON.stringify({
    started: mine.length,
    completed: mine.filter((r) => r.completed).length,
    aborted: mine.filter((r) => r.aborted).length,
    cancelled: mine.filter((r) => r.cancelled).length,
    urls: mine.map((r) => r.url),
  }), { 'Content-Type': 'application/json' });
}

const server = http.createServer((req, res) => {
  const q = req.url.indexOf('?');
  const path = q < 0 ? req.url : req.url.slice(0, q);
  const params = new URLSearchParams(q < 0 ? '' : req.url.slice(q + 1));
  req.on('error', () => {});
  res.on('error', () => {});
  if (path === '/__count') {
    count(req, res, params);
    return;
  }
  const record = { url: req.url, host: req.headers.host, completed: false, aborted: false, answered: false, cancelled: false };
  seen.push(record);
  req.on('end', () => { record.completed = true; });
  req.on('aborted', () => { record.aborted = true; });
  req.on('close', () => { if (!record.completed) record.aborted = true; });
  res.on('finish', () => { record.answered = true; });
  res.on('close', () => { if (!record.answered) record.cancelled = true; });

  let name = mode;
  let arg;
  let options = new URLSearchParams();
  if (path.startsWith('/__')) {
    const parts = path.slice(3).split('/');
    name = parts[0];
    arg = parts[1];
    options = params;
  }
  const handler = handlers[name];
  if (!handler) {
    req.resume();
    text(res, 404, 'no such backend behaviour: ' + name + '\n');
    return;
  }
  handler(req, res, options, arg);
});

if (env.KEEPALIVE_MS) server.keepAliveTimeout = Number(env.KEEPALIVE_MS);
server.requestTimeout = 0; // long uploads must not be cut at node's 300 s
server.on('clientError', (err, socket) => {
  if (socket.writable) socket.end('HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n');
});

if (!handlers[mode]) {
  process.stderr.write('unknown mode: ' + mode + '\n');
  process.exit(2);
}

server.listen(port, '127.0.0.1', () => {
  actualPort = server.address().port;
  process.stdout.write('listening ' + actualPort + '\n');
});
