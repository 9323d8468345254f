"""Settings: the memory budget, the reserve left for other programs, idle unload, and where data lives."""
import gradio as gr

from .common import admin_only, gib, require_admin


def fill(studio, owner: str | None) -> dict:
    """Settings are shared: a remote user sees them, only the admin changes them."""
    shown = studio.user(owner).admin
    return {**admin_only(studio, owner, "save", "unload"),
            **{n: gr.update(interactive=shown) for n in ("budget", "reserve", "idle")}}


def build(studio, auth: bool = False) -> dict:  # settings are shared: with auth only the admin changes them
    c = studio.config
    total = studio.device.read().total
    gr.Markdown("Jobs whose estimate exceeds the budget are refused at submit, with what would fit. "
                "Budget 0 means the device's total minus the reserve.")
    with gr.Row():
        budget = gr.Number(c.budget_gb, label="Budget (GiB, 0 = total − reserve)", minimum=0)
        reserve = gr.Number(c.reserve_gb, label="Reserve for the desktop and other programs (GiB)", minimum=0)
        idle = gr.Number(c.idle_unload_s, label="Unload cached models after idle (s)", minimum=10)
    data_dir = gr.Textbox(str(c.data_dir), label="Data folder (change with --data-dir or STUDIO_DATA_DIR and "
                          "restart)", interactive=False)
    with gr.Row():
        save = gr.Button("Save settings", variant="primary")
        unload = gr.Button("Unload cached models now")
    status = gr.Markdown(f"Current budget: {gib(c.budget_bytes(total))} of {gib(total)}.")

    def on_save(budget_gb, reserve_gb, idle_s, request: gr.Request):
        require_admin(studio, request, auth, "Changing settings")
        if budget_gb is None or budget_gb < 0 or reserve_gb is None or reserve_gb < 0:
            raise gr.Error("Budget and reserve must be 0 or more.")
        if idle_s is None or idle_s < 10:
            raise gr.Error("Idle unload must be at least 10 s.")
        if budget_gb and budget_gb * 2**30 > total:
            raise gr.Error(f"The budget cannot exceed the device's {gib(total)}.")
        cfg = studio.update_config(budget_gb=float(budget_gb), reserve_gb=float(reserve_gb),
                                   idle_unload_s=float(idle_s))
        return f"Saved. Budget now {gib(cfg.budget_bytes(total))} of {gib(total)}."

    save.click(on_save, inputs=[budget, reserve, idle], outputs=status, api_name="save_settings")

    devices = device_settings(studio, auth) if len(studio.devices) > 1 else {}

    def on_unload(request: gr.Request):
        require_admin(studio, request, auth, "Unloading the models everyone shares")
        held = studio.meter()["cache_bytes"]
        studio.unload_models()
        return f"Unloading {gib(held)} of cached models; the meter shows the memory come back."

    unload.click(on_unload, None, status, api_name="unload_models")
    return dict(budget=budget, reserve=reserve, idle=idle, data_dir=data_dir, save=save, unload=unload,
                status=status, **devices)


DEVICE_COLUMNS = ["device", "name", "total GiB", "budget GiB", "reserve GiB", "use"]


def device_rows(studio) -> list[list]:
    c = studio.config
    rows = []
    for i, dev in enumerate(studio.devices):
        own, r = c.device_settings(i), dev.read()
        rows.append([i, r.name, round(r.total / 2**30, 2), float(own.get("budget_gb", c.budget_gb)),
                     float(own.get("reserve_gb", c.reserve_gb)), bool(own.get("use", True))])
    return rows


def parse_device_rows(rows: list[list], totals: list[int]) -> dict:
    """The Devices table back into `Config.devices`; a bad cell raises ValueError naming it."""
    out = {}
    if len(rows) != len(totals):
        raise ValueError(f"the table must keep one row per device ({len(totals)}); reload the page")
    for i, row in enumerate(rows):
        try:
            budget, reserve = float(row[3]), float(row[4])
        except (TypeError, ValueError):
            raise ValueError(f"device {i}: budget and reserve must be numbers") from None
        use = row[5] if isinstance(row[5], bool) else str(row[5]).strip().lower() in ("true", "1", "yes")
        if budget < 0 or reserve < 0:
            raise ValueError(f"device {i}: budget and reserve must be 0 or more")
        if budget * 2**30 > totals[i]:
            raise ValueError(f"device {i}: the budget cannot exceed its {totals[i] / 2**30:.1f} GiB")
        out[str(i)] = {"budget_gb": budget, "reserve_gb": reserve, "use": use}
    if not any(v["use"] for v in out.values()):
        raise ValueError("at least one device must stay in use")
    return out


def device_settings(studio, auth: bool) -> dict:
    """Per-card settings on a box with several GPUs: each card's budget and reserve, and "do not use" for the card
    that drives the desktop (the lanes follow it at the next start)."""
    gr.Markdown("**Devices.** Each card has its own worker, budget and model cache; a job goes to the card where it "
                "fits best, or to the one it names (`device=1`). Budget 0 means the card's total minus its reserve. "
                "\"use\" takes effect at the next start.")
    table = gr.Dataframe(device_rows(studio), headers=DEVICE_COLUMNS, datatype=["number", "str", "number", "number",
                         "number", "bool"], static_columns=[0, 1, 2], interactive=True, label="Devices")
    save_devices = gr.Button("Save device settings")
    note = gr.Markdown()

    def on_save_devices(rows, request: gr.Request):
        require_admin(studio, request, auth, "Changing device settings")
        values = rows.values.tolist() if hasattr(rows, "values") else rows
        totals = [d.read().total for d in studio.devices]
        try:
            devices = parse_device_rows(values, totals)
        except ValueError as e:
            raise gr.Error(str(e)) from None
        restart = {i for i, v in devices.items() if v["use"] != studio.config.device_used(int(i))}
        studio.update_config(devices=devices)
        return "Saved." + (" Restart the studio for the cards in use to change." if restart else "")

    save_devices.click(on_save_devices, table, note, api_name="save_device_settings")
    return dict(devices_table=table, save_devices=save_devices, devices_note=note)
