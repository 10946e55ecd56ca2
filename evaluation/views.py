from django.shortcuts import render


def history(request):
    return render(request, "evaluation/history.html", {"runs": []})
