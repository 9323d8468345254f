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

    def on_unload(request: gr.Request):
        require_admin(studio, request, auth, "Unloading the models everyone shares")
        held = studio.meter()["cache_bytes"]
        studio.unload_models()
        return f"Unloading {gib(held)} of cached models; the meter shows the memory come back."

    unload.click(on_unload, None, status, api_name="unload_models")
    return dict(budget=budget, reserve=reserve, idle=idle, data_dir=data_dir, save=save, unload=unload,
                status=status)
