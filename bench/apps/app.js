// A naive Node HTTP app for deployd's benchmarks: no graceful shutdown, no
// signal handling. GET /healthz answers "ok"; anything else a short line.
const http = require("http");
const body = `hello from ${process.env.VERSION || process.env.TAG || "app"}\n`;
http
  .createServer((req, res) => {
    res.end(req.url === "/healthz" ? "ok\n" : body);
  })
  .listen(Number(process.env.PORT), "127.0.0.1");
