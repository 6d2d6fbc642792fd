// A list of API objects: filter, sort by any column, choose the columns (kept per list in
// local storage), and select rows for bulk actions.

import { useMemo, useState, type ReactNode } from "react";
import type { ApiObject } from "../api/client";

export interface Column {
  id: string;
  title: string;
  /** What the column sorts and filters by. */
  value: (o: ApiObject) => string | number;
  render?: (o: ApiObject) => ReactNode;
  /** Shown only when chosen (like `-o wide`). */
  optional?: boolean;
}

interface Props {
  id: string;
  columns: Column[];
  rows: ApiObject[];
  selectable?: boolean;
  selected?: Set<string>;
  onSelect?: (names: Set<string>) => void;
  actions?: ReactNode;
  empty?: ReactNode;
}

function chosenColumns(id: string, columns: Column[]): string[] {
  const saved = localStorage.getItem(`flotilla.columns.${id}`);
  if (saved) {
    try {
      return JSON.parse(saved);
    } catch {
      /* fall through to the defaults */
    }
  }
  return columns.filter((c) => !c.optional).map((c) => c.id);
}

export function Table({ id, columns, rows, selectable, selected, onSelect, actions, empty }: Props) {
  const [filter, setFilter] = useState("");
  const [sort, setSort] = useState<{ by: string; descending: boolean }>({ by: "name", descending: false });
  const [shown, setShown] = useState<string[]>(() => chosenColumns(id, columns));
  const [choosing, setChoosing] = useState(false);
  const visible = columns.filter((c) => shown.includes(c.id) || c.id === "name");

  const filtered = useMemo(() => {
    const words = filter.toLowerCase().split(/\s+/).filter(Boolean);
    let out = rows;
    if (words.length) {
      out = rows.filter((o) => {
        const text = visible.map((c) => String(c.value(o))).join(" ").toLowerCase();
        return words.every((w) => text.includes(w));
      });
    }
    const column = columns.find((c) => c.id === sort.by) ?? columns[0];
    const sorted = [...out].sort((a, b) => {
      const x = column.value(a);
      const y = column.value(b);
      const order = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
      return sort.descending ? -order : order;
    });
    return sorted;
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [rows, filter, sort, shown]);

  const toggleColumn = (c: string) => {
    const next = shown.includes(c) ? shown.filter((x) => x !== c) : [...shown, c];
    setShown(next);
    localStorage.setItem(`flotilla.columns.${id}`, JSON.stringify(next));
  };
  const allSelected = selectable && filtered.length > 0 && filtered.every((o) => selected?.has(o.metadata.name));
  const toggleAll = () => {
    if (!onSelect) return;
    onSelect(allSelected ? new Set() : new Set(filtered.map((o) => o.metadata.name)));
  };
  const toggleRow = (name: string) => {
    if (!onSelect || !selected) return;
    const next = new Set(selected);
    if (next.has(name)) next.delete(name);
    else next.add(name);
    onSelect(next);
  };

  return (
    <div className="table">
      <div className="toolbar">
        <input
          className="filter"
          type="search"
          placeholder="Filter"
          aria-label="Filter"
          value={filter}
          onChange={(e) => setFilter(e.target.value)}
        />
        <span className="count">
          {filtered.length === rows.length ? `${rows.length}` : `${filtered.length} of ${rows.length}`}
        </span>
        {actions}
        <div className="chooser">
          <button type="button" onClick={() => setChoosing(!choosing)} aria-expanded={choosing}>
            Columns
          </button>
          {choosing && (
            <div className="menu" role="menu">
              {columns
                .filter((c) => c.id !== "name")
                .map((c) => (
                  <label key={c.id}>
                    <input type="checkbox" checked={shown.includes(c.id)} onChange={() => toggleColumn(c.id)} />
                    {c.title}
                  </label>
                ))}
            </div>
          )}
        </div>
      </div>
      <table>
        <thead>
          <tr>
            {selectable && (
              <th className="select">
                <input type="checkbox" aria-label="Select all" checked={!!allSelected} onChange={toggleAll} />
              </th>
            )}
            {visible.map((c) => (
              <th
                key={c.id}
                onClick={() => setSort({ by: c.id, descending: sort.by === c.id ? !sort.descending : false })}
                aria-sort={sort.by === c.id ? (sort.descending ? "descending" : "ascending") : "none"}
              >
                {c.title}
                {sort.by === c.id ? (sort.descending ? " ▾" : " ▴") : ""}
              </th>
            ))}
          </tr>
        </thead>
        <tbody>
          {filtered.map((o) => (
            <tr key={`${o.metadata.namespace ?? ""}/${o.metadata.name}`} data-name={o.metadata.name}>
              {selectable && (
                <td className="select">
                  <input
                    type="checkbox"
                    aria-label={`Select ${o.metadata.name}`}
                    checked={selected?.has(o.metadata.name) ?? false}
                    onChange={() => toggleRow(o.metadata.name)}
                  />
                </td>
              )}
              {visible.map((c) => (
                <td key={c.id} data-column={c.id}>
                  {c.render ? c.render(o) : String(c.value(o))}
                </td>
              ))}
            </tr>
          ))}
        </tbody>
      </table>
      {rows.length === 0 && <div className="empty">{empty ?? "Nothing here yet."}</div>}
    </div>
  );
}

/** "3m", "5h", "2d": how long ago, as `flotilla get` prints it. */
export function age(timestamp?: string | null): string {
  if (!timestamp) return "";
  const seconds = Math.max(0, (Date.now() - Date.parse(timestamp)) / 1000);
  if (seconds < 120) return `${Math.floor(seconds)}s`;
  if (seconds < 7200) return `${Math.floor(seconds / 60)}m`;
  if (seconds < 172800) return `${Math.floor(seconds / 3600)}h`;
  return `${Math.floor(seconds / 86400)}d`;
}

export function ageValue(o: ApiObject): number {
  const t = o.metadata.creationTimestamp;
  return t ? -Date.parse(t) : 0;
}

export function ErrorBox({ error }: { error: unknown }) {
  if (!error) return null;
  const message = error instanceof Error ? error.message : String(error);
  return (
    <div className="error" role="alert">
      {message}
    </div>
  );
}
