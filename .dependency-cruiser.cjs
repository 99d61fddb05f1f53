// The layers of src/, bottom to top (docs/ARCHITECTURE.md). A folder may import its own layer
// and the ones below it, never one above: test/layers.test.ts runs this in the suite.
// util/ and types/ hold leaf helpers every layer may use.
const LAYERS = [
  ['protocol'],
  ['blockdev'],
  ['nbd', 'iscsi'],
  ['controller'],
  ['cluster'],
  ['gateway'],
  ['cfs', 'xfer'],
  ['admin'],
  ['cli'],
];

const forbidden = LAYERS.flatMap((folders, level) => {
  const above = LAYERS.slice(level + 1).flat();
  if (above.length === 0) return [];
  return folders.map((folder) => ({
    name: `${folder}-imports-upward`,
    comment: `src/${folder}/ is below ${above.join(', ')}: it must not import them (move the shared piece down, or pass it in)`,
    severity: 'error',
    from: { path: `^src/${folder}/` },
    to: { path: `^src/(${above.join('|')})/` },
  }));
});

// Folders of the same level do not lean on each other either (nbd and iscsi are siblings).
for (const folders of LAYERS) {
  if (folders.length < 2) continue;
  for (const folder of folders) {
    forbidden.push({
      name: `${folder}-imports-sibling`,
      comment: `src/${folder}/ and ${folders.filter((f) => f !== folder).join(', ')} are one layer: share through a lower one`,
      severity: 'error',
      from: { path: `^src/${folder}/` },
      to: { path: `^src/(${folders.filter((f) => f !== folder).join('|')})/` },
    });
  }
}

forbidden.push({
  name: 'leaf-helpers-import-nothing-of-ours',
  comment: 'util/ and types/ are used by every layer, so they import no layer',
  severity: 'error',
  from: { path: '^src/(util|types)/' },
  to: { path: `^src/(${LAYERS.flat().join('|')})/` },
});

module.exports = {
  forbidden,
  options: {
    doNotFollow: { path: 'node_modules' },
    tsConfig: { fileName: 'tsconfig.json' },
    tsPreCompilationDeps: true,
    exclude: { path: '\\.d\\.ts$' },
  },
};
