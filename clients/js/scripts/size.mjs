// Prints the minified and gzipped size of the browser bundle (npm run bundle first).
import { readFileSync } from "node:fs";
import { gzipSync } from "node:zlib";

const file = new URL("../dist/arqonbus.min.js", import.meta.url);
let code;
try {
  code = readFileSync(file);
} catch {
  console.error("dist/arqonbus.min.js is missing: run npm run bundle first");
  process.exit(1);
}
const gzipped = gzipSync(code, { level: 9 }).length;
const goal = 10 * 1024;
console.log(`dist/arqonbus.min.js: ${code.length} bytes minified, ${gzipped} bytes gzipped (goal <= ${goal})`);
if (gzipped > goal) console.log(`over the goal by ${gzipped - goal} bytes`);
