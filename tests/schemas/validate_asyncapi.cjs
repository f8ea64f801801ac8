// Parses an AsyncAPI document with the AsyncAPI parser (its JSON Schema validation, the
// Spectral ruleset it ships, and the resolution of every $ref) and prints its diagnostics
// as JSON lines; exits 1 when any is an error or a warning.
//   node validate_asyncapi.cjs path/to/asyncapi.yaml   (NODE_PATH: where @asyncapi/parser is)
const { Parser, fromFile } = require("@asyncapi/parser");

async function main(path) {
  const parser = new Parser();
  const { document, diagnostics } = await fromFile(parser, path).parse();
  let bad = 0;
  for (const d of diagnostics) {
    // Spectral severities: 0 error, 1 warning, 2 information, 3 hint.
    if (d.severity <= 1) bad += 1;
    console.log(JSON.stringify({ severity: d.severity, code: d.code, path: d.path.join("."), message: d.message }));
  }
  if (document === undefined) bad += 1;
  else console.log(JSON.stringify({ channels: document.channels().length, messages: document.allMessages().length }));
  process.exit(bad ? 1 : 0);
}

main(process.argv[2]).catch((e) => { console.error(e); process.exit(2); });
