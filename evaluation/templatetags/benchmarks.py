from django import template

register = template.Library()


@register.filter
def pct(metrics, key):
    """A fraction from a metrics dict as a percentage with one decimal, or a dash."""
    value = (metrics or {}).get(key)
    return "—" if value is None else f"{100 * value:.1f}"


@register.filter
def num(metrics, key):
    """A plain number from a metrics dict (ranks), or a dash."""
    value = (metrics or {}).get(key)
    if value is None:
        return "—"
    return f"{value:g}" if isinstance(value, int) or float(value).is_integer() else f"{value:.2f}"


@register.filter
def ms(value):
    return "—" if value is None else f"{value:.1f}"
