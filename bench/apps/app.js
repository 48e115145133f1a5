// A naive Node HTTP app for deployd's benchmarks: no graceful shutdown, no
// signal handling. GET /healthz answers "ok"; GET /work?us=N spends N µs
// of CPU first, as a handler doing real work would; anything else a short
// line.
const http = require("http");
const body = `hello from ${process.env.VERSION || process.env.TAG || "app"}\n`;
http
  .createServer((req, res) => {
    if (req.url.startsWith("/work?us=")) {
      const until = process.hrtime.bigint() + BigInt(Number(req.url.slice(9)) * 1000 || 0);
      while (process.hrtime.bigint() < until) {}
    }
    res.end(req.url === "/healthz" ? "ok\n" : body);
  })
  .listen(Number(process.env.PORT), process.env.HOST || "127.0.0.1");
