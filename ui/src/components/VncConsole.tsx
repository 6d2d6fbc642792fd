// The VM's screen in noVNC, over the server's WebSocket (opened with a single-use ticket);
// QEMU's VNC server is a unix socket on the node, never on the network.

import { useEffect, useRef, useState } from "react";
import RFB from "@novnc/novnc";
import { consoleSocketUrl } from "../api/client";

export default function VncConsole({ project, name }: { project: string; name: string }) {
  const box = useRef<HTMLDivElement>(null);
  const [state, setState] = useState("connecting");
  const rfb = useRef<RFB | null>(null);
  useEffect(() => {
    let closed = false;
    (async () => {
      let url;
      try {
        url = await consoleSocketUrl(project, name, "vnc");
      } catch (e: any) {
        setState(`error: ${e.message ?? e}`);
        return;
      }
      if (closed) return;
      const client = new RFB(box.current!, url, { shared: true });
      client.scaleViewport = true;
      client.resizeSession = false;
      client.addEventListener("connect", () => setState("connected"));
      client.addEventListener("disconnect", (e: any) => setState(e.detail?.clean ? "closed" : "closed: the connection broke"));
      rfb.current = client;
    })();
    return () => {
      closed = true;
      rfb.current?.disconnect();
      rfb.current = null;
    };
  }, [project, name]);
  return (
    <div className="console">
      <div className="console-state" data-state={state}>
        VNC: {state}{" "}
        <button type="button" disabled={state !== "connected"} onClick={() => rfb.current?.sendCtrlAltDel()}>
          Send Ctrl-Alt-Del
        </button>
      </div>
      <div className="screen" ref={box} data-testid="vnc-screen" />
    </div>
  );
}
