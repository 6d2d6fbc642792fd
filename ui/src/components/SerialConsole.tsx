// The VM's serial console in xterm.js, over the server's WebSocket (opened with a
// single-use ticket). Everyone watching sees the same output; recent output comes first.

import { useEffect, useRef, useState } from "react";
import { Terminal } from "@xterm/xterm";
import { FitAddon } from "@xterm/addon-fit";
import "@xterm/xterm/css/xterm.css";
import { consoleSocketUrl } from "../api/client";

export default function SerialConsole({ project, name }: { project: string; name: string }) {
  const box = useRef<HTMLDivElement>(null);
  const [state, setState] = useState("connecting");
  useEffect(() => {
    const terminal = new Terminal({ convertEol: false, cursorBlink: true, fontSize: 14, scrollback: 5000 });
    const fit = new FitAddon();
    terminal.loadAddon(fit);
    terminal.open(box.current!);
    fit.fit();
    const resize = () => fit.fit();
    window.addEventListener("resize", resize);
    let socket: WebSocket | null = null;
    let closed = false;
    (async () => {
      try {
        socket = new WebSocket(await consoleSocketUrl(project, name, "console"));
      } catch (e: any) {
        setState(`error: ${e.message ?? e}`);
        return;
      }
      if (closed) return socket.close();
      socket.binaryType = "arraybuffer";
      socket.onopen = () => {
        setState("connected");
        terminal.focus();
      };
      socket.onmessage = (m) => terminal.write(typeof m.data === "string" ? m.data : new Uint8Array(m.data));
      socket.onclose = (e) => setState(e.reason ? `closed: ${e.reason}` : "closed");
    })();
    const typed = terminal.onData((data) => {
      if (socket?.readyState === WebSocket.OPEN) socket.send(new TextEncoder().encode(data));
    });
    return () => {
      closed = true;
      typed.dispose();
      socket?.close();
      window.removeEventListener("resize", resize);
      terminal.dispose();
    };
  }, [project, name]);
  return (
    <div className="console">
      <div className="console-state" data-state={state}>
        Serial console: {state}
      </div>
      <div className="terminal" ref={box} data-testid="serial-console" />
    </div>
  );
}
