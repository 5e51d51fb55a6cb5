// A tiny HTTP handler that returns the current time as JSON.
const http = require("http");

http.createServer((req, res) => {
  res.writeHead(200, { "Content-Type": "application/json" });
  res.end(JSON.stringify({ now: new Date().toISOString() }));
}).listen(3000);
