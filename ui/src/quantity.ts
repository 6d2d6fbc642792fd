// Kubernetes quantities ("512Mi", "2Gi", "1G") as bytes, and bytes for people.

const UNITS: Record<string, number> = {
  "": 1, k: 1e3, M: 1e6, G: 1e9, T: 1e12, P: 1e15,
  Ki: 2 ** 10, Mi: 2 ** 20, Gi: 2 ** 30, Ti: 2 ** 40, Pi: 2 ** 50,
};

export function bytes(q: string | number | null | undefined): number {
  if (q === null || q === undefined) return 0;
  if (typeof q === "number") return q;
  const m = /^([0-9.]+)\s*([A-Za-z]*)$/.exec(q.trim());
  if (!m) return 0;
  return Number(m[1]) * (UNITS[m[2]] ?? 1);
}

export function human(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(n < 10 && i > 0 ? 1 : 0)} ${units[i]}`;
}
