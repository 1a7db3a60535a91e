"""How the steering study's learned edits line up with other directions: the difference of means,
probes, and (when an SAE is cached at the edit's layer) the SAE's decoder rows."""

from __future__ import annotations


def alignment(model, data, sae_layer: int | None) -> dict:
    """How the learned edits line up with the difference of means, with probes and (when an SAE is
    cached at ``sae_layer``) with its decoder rows."""
    from mechlie.control import edits
    from mechlie.studies.steering_data import reference_directions

    alignment = {}
    sae_rows = cached_sae_rows(model, sae_layer) if sae_layer is not None else None
    typical = (2 / (3.14159 * model.cfg.d_model)) ** 0.5  # kept as written (not math.pi): the same numbers
    for name, e in data.edits.items():
        at = sorted(e.vectors) if isinstance(e, edits.LearnedVector) else [e.layer]
        alignment[name] = {f"layer {l}": edits.alignment(e, reference_directions(data, l), l) for l in at}
        for l in at:
            alignment[name][f"layer {l}"]["random_direction_typical_abs_cos"] = typical
            if isinstance(sae_rows, tuple) and l == sae_layer:
                rows = edits.row_alignment(e.direction(l), sae_rows[1])
                alignment[name][f"layer {l}"]["sae_decoder_rows"] = rows | {"sae": sae_rows[0]}
    if sae_layer is not None:
        dom = reference_directions(data, sae_layer, ("diff_of_means",))["diff_of_means"]
        alignment["diff_of_means (reference)"] = {
            f"layer {sae_layer}": {"sae_decoder_rows": edits.row_alignment(dom, sae_rows[1]) | {"sae": sae_rows[0]}}
            if isinstance(sae_rows, tuple)
            else {"sae_decoder_rows": sae_rows}
        }
    return alignment


def cached_sae_rows(model, layer: int):
    """``(path, decoder rows)`` of the cached SAE at ``blocks.{layer+1}.hook_resid_pre`` (= resid_post of
    block ``layer``, where a learned vector is added), as analyses/sae_features.py trains it with its
    default settings; or the reason it is absent (it is not trained here: that takes long)."""
    try:
        from mechlie import sae as msae
        from mechlie.core.hooks import hook_name
        from mechlie.core.models import default_cache_dir

        cfg = msae.SAETrainConfig(site=hook_name("resid_pre", layer + 1))
        path = default_cache_dir() / "sae" / msae.cache_key(model, cfg)
        if not (path / "mechlie.json").is_file():
            return f"no cached SAE for {cfg.site} (run analyses/sae_features.py first)"
        sae = msae.load_sae(path)
        msae.check_sae(sae, model, msae.Site.parse(cfg.site))
        return str(path), msae.decoder_rows(sae).float().cpu()
    except Exception as e:  # the SAE is optional here: report why it is missing
        return f"SAE not loaded: {type(e).__name__}: {str(e)[:200]}"


__all__ = ["alignment", "cached_sae_rows"]
