// Compile trustcap's contracts with the pinned solc-js (no native compiler download) and write
// artifacts/<Contract>.json (ABI, creation and runtime bytecode, compiler version and settings).
// Settings are pinned here so a recompile is byte-for-byte the committed artifacts:
//   node compile.mjs           write artifacts/
//   node compile.mjs --check   compile in memory; exit 1 naming each artifact that differs
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const solc = require("solc");
const here = path.dirname(fileURLToPath(import.meta.url));

export const SETTINGS = {
  optimizer: { enabled: true, runs: 200 },
  evmVersion: "cancun",
  viaIR: false,
  metadata: { bytecodeHash: "none", appendCBOR: false },
  outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] } },
};
const SOURCES = ["src/NodeRegistry.sol", "src/AttestationLog.sol", "src/Reputation.sol", "src/TaskEscrow.sol",
  "bench/NaiveLog.sol"];

function findImport(p) {
  for (const base of [here, path.join(here, "node_modules")]) {
    const full = path.join(base, p);
    if (fs.existsSync(full)) return { contents: fs.readFileSync(full, "utf8") };
  }
  return { error: `import not found: ${p}` };
}

function compile() {
  const sources = {};
  for (const s of SOURCES) sources[s] = { content: fs.readFileSync(path.join(here, s), "utf8") };
  const input = { language: "Solidity", sources, settings: SETTINGS };
  const out = JSON.parse(solc.compile(JSON.stringify(input), { import: findImport }));
  const errors = (out.errors || []).filter((e) => e.severity === "error");
  for (const e of out.errors || []) process.stderr.write(e.formattedMessage + "\n");
  if (errors.length) process.exit(2);
  const artifacts = {};
  for (const s of SOURCES) {
    for (const [name, c] of Object.entries(out.contracts[s])) {
      artifacts[name] = JSON.stringify({
        contractName: name,
        sourceName: s,
        compiler: { name: "solc-js", version: solc.version(), settings: SETTINGS },
        abi: c.abi,
        bytecode: "0x" + c.evm.bytecode.object,
        deployedBytecode: "0x" + c.evm.deployedBytecode.object,
      }, null, 2) + "\n";
    }
  }
  return artifacts;
}

const artifacts = compile();
const dir = path.join(here, "artifacts");
if (process.argv.includes("--check")) {
  let bad = 0;
  for (const [name, text] of Object.entries(artifacts)) {
    const file = path.join(dir, `${name}.json`);
    if (!fs.existsSync(file) || fs.readFileSync(file, "utf8") !== text) {
      process.stderr.write(`artifact differs from a fresh compile: artifacts/${name}.json\n`);
      bad += 1;
    }
  }
  if (bad) process.exit(1);
  process.stdout.write(`${Object.keys(artifacts).length} artifacts match a fresh compile\n`);
} else {
  fs.mkdirSync(dir, { recursive: true });
  for (const [name, text] of Object.entries(artifacts)) fs.writeFileSync(path.join(dir, `${name}.json`), text);
  process.stdout.write(`wrote ${Object.keys(artifacts).length} artifacts to ${dir}\n`);
}
